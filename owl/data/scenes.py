"""A procedural world of flat coloured shapes, and its renderer.

A :class:`Scene` is pure data: a background colour and one to four :class:`Shape` objects placed in
*canvas fractions*. Positions are fractions of the width and height; a shape's ``radius`` is a fraction
of the canvas's *shorter* side, so shapes keep their proportions (a circle stays round) at any aspect
ratio. Every shape fits inside the disc of its radius, which gives two guarantees that hold at *every*
resolution and aspect ratio, because each pixel axis is at least as long as the shorter side:

* in bounds: ``radius <= x <= 1 - radius`` (and the same for ``y``) keeps the disc inside the canvas;
* no overlap: a centre distance of at least the sum of the radii (in fractions) is at least that many
  pixels apart once rendered.

Questions about a scene (see :mod:`owl.data.dialogues`) are answered from this data alone, so the
renderer is free to vary resolution, anti-aliasing, noise and JPEG compression.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Rgb = tuple[int, int, int]

# Object colours: eight hues far apart in RGB so that noise and JPEG cannot turn one into another.
COLOURS: dict[str, Rgb] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 0),
    "purple": (140, 50, 180),
    "orange": (245, 130, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
# Backgrounds get names too: the one-sentence description mentions them.
BACKGROUNDS: dict[str, Rgb] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "beige": (225, 210, 170),
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")

# Radius ranges (fractions of the shorter side). The model squashes every image to a square, which
# shrinks shapes along the long side of a 2:1 canvas; a gap of 1.9x keeps a squashed "large" bigger than
# any "small".
RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (0.06, 0.08), "large": (0.15, 0.18)}
# Minimum empty space between two shapes' discs, and between shape centres along x (so the
# left-to-right order used by descriptions is visible).
MIN_GAP = 0.04
MIN_X_SEPARATION = 0.06
# An object colour must differ from the background by at least this RGB distance.
MIN_CONTRAST = 120.0
MAX_OBJECTS = 4


class SceneError(ValueError):
    """A scene that breaks the world's rules; the message names the rule."""


@dataclass(frozen=True)
class Shape:
    """One object. ``x``/``y`` are fractions of the canvas; ``radius`` of its shorter side."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    radius: float

    def __post_init__(self) -> None:
        if self.kind not in SHAPE_KINDS:
            raise SceneError(f"shape kind must be one of {SHAPE_KINDS}, got {self.kind!r}")
        if self.colour not in COLOURS:
            raise SceneError(f"shape colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if self.size not in SIZES:
            raise SceneError(f"shape size must be one of {SIZES}, got {self.size!r}")


@dataclass(frozen=True)
class Scene:
    """A background and 1-4 non-overlapping shapes, validated on construction."""

    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise SceneError(f"background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")
        if not 1 <= len(self.shapes) <= MAX_OBJECTS:
            raise SceneError(f"a scene holds 1 to {MAX_OBJECTS} shapes, got {len(self.shapes)}")
        for shape in self.shapes:
            if not contrasts(shape.colour, self.background):
                raise SceneError(f"a {shape.colour} shape is not visible on a {self.background} background")
            if not inside(shape):
                raise SceneError(f"{shape} reaches outside the canvas")
        for i, a in enumerate(self.shapes):
            for b in self.shapes[i + 1 :]:
                if not apart(a, b):
                    raise SceneError(f"{a} and {b} overlap or are too close along x")

    def left_to_right(self) -> tuple[Shape, ...]:
        """Shapes in the fixed order used by descriptions (centres differ by MIN_X_SEPARATION)."""
        return tuple(sorted(self.shapes, key=lambda s: (s.x, s.y)))


def contrasts(colour: str, background: str) -> bool:
    """Whether an object colour stands out on a background (never the same colour)."""
    return colour != background and math.dist(COLOURS[colour], BACKGROUNDS[background]) >= MIN_CONTRAST


def inside(shape: Shape) -> bool:
    """The shape's disc lies inside the canvas at any aspect ratio (see the module docstring)."""
    r = shape.radius
    return r <= shape.x <= 1 - r and r <= shape.y <= 1 - r


def apart(a: Shape, b: Shape) -> bool:
    """The discs are separated by MIN_GAP and the centres by MIN_X_SEPARATION along x."""
    far = math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + MIN_GAP
    return far and abs(a.x - b.x) >= MIN_X_SEPARATION


def random_scene(
    rng: random.Random,
    *,
    num_objects: int | None = None,
    kinds: Sequence[str] | None = None,
    repeats: float = 0.0,
    max_tries: int = 1000,
) -> Scene:
    """A random valid scene.

    ``num_objects`` fixes the count; ``kinds`` fixes the shape kinds (its length is the count), which
    lets dialogue generation build pairs of scenes with equal counts or equal shape sets so that
    "Yes." answers are as common as "No.". Placement is rejection sampling, restarted from an empty
    canvas when a shape finds no free spot.

    ``repeats`` (a training mix; 0 draws every colour and kind independently, as the evaluation's
    scenes are drawn) is the chance that an object after the first takes the colour of an object
    before it, and, separately, its kind: more pictures with two or three of a colour or a shape.
    """
    if not 0.0 <= repeats <= 1.0:
        raise SceneError(f"repeats must be 0 to 1, got {repeats}")
    if kinds is not None:
        num_objects = len(kinds)
    if num_objects is None:
        num_objects = rng.randint(1, MAX_OBJECTS)
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise SceneError(f"num_objects must be 1 to {MAX_OBJECTS}, got {num_objects}")
    background = rng.choice(sorted(BACKGROUNDS))
    palette = [c for c in COLOURS if contrasts(c, background)]
    for _ in range(max_tries):
        shapes = _place_shapes(rng, num_objects, kinds, palette, repeats)
        if shapes is not None:
            return Scene(background=background, shapes=shapes)
    raise SceneError(f"could not place {num_objects} shapes in {max_tries} tries")


def _place_shapes(
    rng: random.Random, count: int, kinds: Sequence[str] | None, palette: Sequence[str], repeats: float
) -> tuple[Shape, ...] | None:
    """One attempt at placing ``count`` shapes; None when the canvas got too crowded."""
    shapes: list[Shape] = []
    for i in range(count):
        kind = kinds[i] if kinds is not None else rng.choice(SHAPE_KINDS)
        colour = rng.choice(palette)
        if repeats and shapes:  # drawn only when asked for: without, the scene is the one it always was
            if rng.random() < repeats:
                colour = rng.choice(shapes).colour
            if rng.random() < repeats and kinds is None:
                kind = rng.choice(shapes).kind
        size = rng.choice(SIZES)
        radius = rng.uniform(*RADIUS_RANGE[size])
        for _ in range(50):
            candidate = Shape(
                kind=kind,
                colour=colour,
                size=size,
                x=rng.uniform(radius, 1 - radius),
                y=rng.uniform(radius, 1 - radius),
                radius=radius,
            )
            if all(apart(candidate, other) for other in shapes):
                shapes.append(candidate)
                break
        else:
            return None
    return tuple(shapes)


# --- rendering ------------------------------------------------------------------------------------

# Supersampled canvases are capped at this many pixels per side to bound memory and time.
_MAX_SUPERSAMPLED_SIDE = 2048


def render(
    scene: Scene,
    *,
    width: int,
    height: int,
    antialias: bool = True,
    noise: float = 0.0,
    jpeg_quality: int | None = None,
    rng: random.Random | None = None,
) -> Image.Image:
    """Draw a scene as an RGB image.

    ``antialias`` draws on a supersampled canvas and downsamples it (smooth edges); without it edges
    are hard, as PIL draws them. ``noise`` is the standard deviation of Gaussian pixel noise in 0-255
    units, drawn from ``rng`` so a seed fixes it. ``jpeg_quality`` round-trips the image through JPEG
    bytes to add real compression artefacts.
    """
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    image = _draw(scene, width, height, antialias)
    if noise > 0:
        if rng is None:
            raise ValueError("pass rng=random.Random(seed): noise must be reproducible")
        image = add_noise(image, noise, rng)
    if jpeg_quality is not None:
        image = decode(encode_jpeg(image, jpeg_quality))
    return image


def _draw(scene: Scene, width: int, height: int, antialias: bool) -> Image.Image:
    """Rasterise the shapes, supersampling when anti-aliasing."""
    factor = max(1, min(4, _MAX_SUPERSAMPLED_SIDE // max(width, height))) if antialias else 1
    w, h = width * factor, height * factor
    image = Image.new("RGB", (w, h), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    short = min(w, h)
    for shape in scene.shapes:
        centre = (shape.x * w, shape.y * h)
        _draw_shape(draw, shape.kind, centre, shape.radius * short, COLOURS[shape.colour])
    if factor > 1:
        image = image.reduce(factor)  # a box filter over each factor x factor block
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], r: float, fill: Rgb
) -> None:
    """Every outline stays inside the disc of radius ``r`` and contains the centre."""
    cx, cy = centre
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx + dx * r, cy + dy * r) for dx, dy in _OUTLINES[kind]], fill=fill)


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    """A star's outline on the unit disc, first point up."""
    corners = []
    for i in range(2 * points):
        radius = 1.0 if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / points
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return tuple(corners)


def _triangle() -> tuple[tuple[float, float], ...]:
    """An upright equilateral triangle inscribed in the unit disc (centroid at the centre)."""
    return tuple((math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6))


def _cross(arm: float = 0.33, reach: float = 0.9) -> tuple[tuple[float, float], ...]:
    """A plus sign whose far corners stay inside the unit disc."""
    a, b = arm, reach
    return (
        (-a, -b),
        (a, -b),
        (a, -a),
        (b, -a),
        (b, a),
        (a, a),
        (a, b),
        (-a, b),
        (-a, a),
        (-b, a),
        (-b, -a),
        (-a, -a),
    )


# Unit-disc outlines, x right and y down. The square is a little smaller than its circumscribed disc so
# its area looks like the circle's; the diamond is narrower than tall so it is not a turned square.
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)),
    "triangle": _triangle(),
    "star": _star(),
    "cross": _cross(),
    "diamond": ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)),
}


def add_noise(image: Image.Image, std: float, rng: random.Random) -> Image.Image:
    """Gaussian pixel noise, seeded from ``rng`` so that a dataset seed fixes every pixel."""
    generator = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + std * generator.standard_normal(size=pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="RGB")


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes; the dataset writer stores exactly these, so disk and memory images agree."""
    if not 1 <= quality <= 95:
        raise ValueError(f"jpeg_quality must be 1 to 95, got {quality}")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(image: Image.Image) -> bytes:
    """Lossless bytes for images rendered without JPEG compression."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """An RGB image from encoded bytes, fully loaded (no open file handle left behind)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# --- render settings ------------------------------------------------------------------------------

# Training covers these ranges; the robustness settings lie outside them on purpose.
TRAIN_SIDE_RANGE = (96, 512)
TRAIN_MAX_ASPECT = 2.0
TRAIN_JPEG_RANGE = (40, 95)
ROBUST_JPEG_RANGE = (15, 30)
MAX_NOISE = 8.0


@dataclass(frozen=True)
class RenderSettings:
    """How one image is drawn: the keyword arguments of :func:`render`, apart from the rng."""

    width: int
    height: int
    antialias: bool = True
    noise: float = 0.0
    jpeg_quality: int | None = None


def training_settings(rng: random.Random) -> RenderSettings:
    """Sides 96-512 px, aspect 1:2 to 2:1, always anti-aliased; JPEG (quality 40-95) 60% of the time.

    Half of the JPEG images get pixel noise first, like a camera; noise without JPEG would make
    lossless files of hundreds of kilobytes.
    """
    long_side, short_side = _sides(rng, TRAIN_SIDE_RANGE, 1.0, TRAIN_MAX_ASPECT)
    compressed = rng.random() < 0.6
    return RenderSettings(
        *_orient(rng, long_side, short_side),
        antialias=True,
        noise=_noise(rng) if compressed else 0.0,
        jpeg_quality=rng.randint(*TRAIN_JPEG_RANGE) if compressed else None,
    )


def robustness_settings(rng: random.Random) -> RenderSettings:
    """Settings never used in training: hard edges, JPEG quality 15-30, and one of tiny (40-80 px),
    huge (640-1024 px) or extreme aspect (2.5:1 to 4:1) canvases."""
    width, height = _unseen_canvas(rng, rng.choice(("tiny", "huge", "extreme")))
    return RenderSettings(
        width,
        height,
        antialias=False,
        noise=_noise(rng),
        jpeg_quality=rng.randint(*ROBUST_JPEG_RANGE),
    )


def _unseen_canvas(rng: random.Random, mode: str) -> tuple[int, int]:
    """(width, height) of a ``mode`` canvas: "tiny" (40-80 px), "huge" (640-1024 px) or "extreme"
    (aspect 2.5:1 to 4:1)."""
    if mode == "tiny":
        long_side, short_side = _sides(rng, (40, 80), 1.0, TRAIN_MAX_ASPECT)
    elif mode == "huge":
        long_side, short_side = _sides(rng, (640, 1024), 1.0, TRAIN_MAX_ASPECT)
    else:
        long_side, short_side = _sides(rng, (96, 1024), 2.5, 4.0)
    return _orient(rng, long_side, short_side)


# The unseen ways of drawing one at a time: which of them costs what.
UNSEEN_CHANGES = ("hard edges", "low JPEG quality", "tiny canvas", "huge canvas", "extreme aspect")


def one_unseen_change(settings: RenderSettings, change: str, rng: random.Random) -> RenderSettings:
    """``settings`` (training settings) with one of :data:`UNSEEN_CHANGES` made, the rest kept."""
    if change == "hard edges":
        return dataclasses.replace(settings, antialias=False)
    if change == "low JPEG quality":
        return dataclasses.replace(settings, jpeg_quality=rng.randint(*ROBUST_JPEG_RANGE))
    if change in ("tiny canvas", "huge canvas", "extreme aspect"):
        width, height = _unseen_canvas(rng, change.split()[0])
        return dataclasses.replace(settings, width=width, height=height)
    raise ValueError(f"unknown change {change!r}; use one of {', '.join(UNSEEN_CHANGES)}")


def _sides(
    rng: random.Random, side_range: tuple[int, int], min_ratio: float, max_ratio: float
) -> tuple[int, int]:
    """(long, short) with both sides in ``side_range`` and long/short log-uniform in the ratio range."""
    low, high = side_range
    ratio = math.exp(rng.uniform(math.log(min_ratio), math.log(max_ratio)))
    long_side = rng.randint(min(high, math.ceil(low * ratio)), high)
    return long_side, max(low, round(long_side / ratio))


def _orient(rng: random.Random, long_side: int, short_side: int) -> tuple[int, int]:
    """(width, height): landscape or portrait with equal chance."""
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _noise(rng: random.Random) -> float:
    return rng.uniform(1.0, MAX_NOISE) if rng.random() < 0.5 else 0.0


def render_with(scene: Scene, settings: RenderSettings, rng: random.Random) -> Image.Image:
    """:func:`render` with a :class:`RenderSettings`."""
    return render(
        scene,
        width=settings.width,
        height=settings.height,
        antialias=settings.antialias,
        noise=settings.noise,
        jpeg_quality=settings.jpeg_quality,
        rng=rng,
    )
