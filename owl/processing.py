"""Model inputs: images into pixel tensors, prompts into ids with image slots.

Images: PIL images, bytes, file paths, base64 strings or data URIs, and http(s) URLs when the
caller allows them. Each is decoded once, converted to RGB (alpha composited on white), turned
upright by its EXIF orientation (a deliberate deviation from the releases, which ignored it and
so fed phone photos sideways), squashed to a square with bicubic resampling, and normalised with
the CLIP mean and std.

Prompts: BOS, then each text chunk between image slots encoded on its own without special
tokens, and ``num_image_tokens`` slots of ``IMAGE_TOKEN_ID`` for every ``<image>``: exactly how the
releases tokenised, so the same text gives the same ids.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import ipaddress
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from owl.config import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, IMAGE_TOKEN_ID
from owl.conversation import ImageSlot, Segment
from owl.errors import ImageError, ImageTooLarge, PromptError


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be. The defaults fit a public demo; the server makes them configurable."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    url_timeout_s: float = 10.0
    max_redirects: int = 3


DEFAULT_LIMITS = ImageLimits()

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w=.+-]+)*?)(?P<b64>;base64)?,", re.IGNORECASE
)
_BASE64 = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")


def load_image(
    source: Any,
    *,
    allow_urls: bool = False,
    allow_paths: bool = True,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Image.Image:
    """Decode ``source`` into an upright RGB PIL image, or raise ``ImageError`` saying why not.

    A server decodes what clients send with ``allow_paths=False``: a string from a client must
    never open a file on the server's disk.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(_check_pixels(source, limits, "the image"), "the image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), limits, "the uploaded bytes")
    if isinstance(source, Path):
        if not allow_paths:
            raise ImageError("file paths are not accepted here; send the image itself (base64 or a data URI)")
        return _open_path(source, limits)
    if not isinstance(source, str):
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    text = source.strip()
    if not text:
        raise ImageError("empty image reference")
    if text.lower().startswith(("http://", "https://")):
        if not allow_urls:
            raise ImageError("image URLs are not allowed here; upload the image or send it as base64")
        return _decode(fetch_url(text, limits), limits, _short(text))
    if text.lower().startswith("data:"):
        return _decode(_decode_data_uri(text), limits, "the data URI")
    looks_like_path = text.startswith(("/", "~", "./", "../", "file:")) and not text.startswith("/9j/")
    if not allow_paths and looks_like_path:
        raise ImageError(
            f"{_short(text)!r} looks like a file path; send the image itself (base64 or a data URI)"
        )
    if allow_paths and len(text) < 4096 and not text.startswith(("/9j/", "iVBOR", "R0lGOD")):
        path = Path(text).expanduser()
        try:
            is_file = path.is_file()
        except OSError:
            is_file = False
        if is_file:
            return _open_path(path, limits)
    if _BASE64.match(text[:4096]):
        return _decode(_decode_base64(text), limits, "the base64 string")
    if not allow_paths:
        raise ImageError(f"{_short(text)!r} is neither a data URI, an image URL, nor base64 image data")
    raise ImageError(f"{_short(text)!r} is neither an existing file, a URL, nor base64 image data")


def _open_path(path: Path, limits: ImageLimits) -> Image.Image:
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(f"cannot read {path}: {err.strerror}") from err
    if size > limits.max_bytes:
        raise ImageTooLarge(
            f"{path.name} is {size / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.0f} MiB"
        )
    return _decode(path.read_bytes(), limits, path.name)


def _decode_data_uri(uri: str) -> bytes:
    match = _DATA_URI.match(uri)
    if not match:
        raise ImageError("malformed data URI: expected data:image/...;base64,...")
    mime = match.group("mime").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"the data URI holds {mime}, not an image")
    payload = uri[match.end() :]
    if not match.group("b64"):
        from urllib.parse import unquote_to_bytes

        return unquote_to_bytes(payload)
    return _decode_base64(payload)


def _decode_base64(text: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    # Accept the URL-safe alphabet and missing padding, as the releases' clients sent both.
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"invalid base64 image data: {err}") from err


def _decode(data: bytes, limits: ImageLimits, what: str) -> Image.Image:
    if not data:
        raise ImageError(f"{what} is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"{what} is {len(data) / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.0f} MiB"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL refuses at open what is far past its own limit
        raise ImageTooLarge(f"{what} is too large to decode safely") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{what} is not an image format we can read (PNG, JPEG, GIF, WebP, BMP, TIFF)"
        ) from None
    except (OSError, ValueError) as err:
        raise ImageError(f"{what} could not be opened: {err}") from None
    _check_pixels(image, limits, what)
    try:
        image.seek(0)  # animated images: the first frame
        image.load()
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{what} is too large to decode safely") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{what} is corrupt or truncated: {err}") from None
    return _to_rgb(image, what)


def _check_pixels(image: Image.Image, limits: ImageLimits, what: str) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{what} has no pixels ({width}×{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"{what} is {width}×{height} = {width * height / 1e6:.0f} megapixels; "
            f"the limit is {limits.max_pixels / 1e6:.0f} megapixels"
        )
    return image


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of clipping everything to white.
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) or 1.0
        scale = 255.0 / (65535.0 if top > 255 else top if top > 1 else 1.0)
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageError(f"{what} could not be converted to RGB: {err}") from None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- URLs ----------------------------------------------------------------------------------------


_METADATA_ADDRESSES = {"169.254.169.254", "100.100.100.200", "fd00:ec2::254"}


def resolve(host: str, port: int) -> list[str]:
    try:
        return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except socket.gaierror as err:
        raise ImageError(f"cannot resolve {host}: {err.strerror}") from None


def forbidden(address: str) -> bool:
    """Loopback, private, link-local, reserved, multicast, unspecified and cloud metadata addresses."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or str(ip) in _METADATA_ADDRESSES
    )


def check_public_host(host: str, port: int) -> str:
    """The address to connect to; refused if any address of ``host`` is not public."""
    addresses = resolve(host, port)
    for address in addresses:
        if forbidden(address):
            raise ImageError(f"image URLs may not point to {host} ({address}): not a public address")
    return addresses[0]


def fetch_url(url: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """GET a public http(s) URL with size and time limits.

    The connection goes to the very address that was checked (no second DNS lookup that could
    answer differently), and every redirect is checked again.
    """
    import certifi
    import urllib3

    deadline = time.monotonic() + limits.url_timeout_s
    for _ in range(limits.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"only http(s) image URLs are allowed, got {_short(url)!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = check_public_host(parts.hostname, port)
        timeout = urllib3.Timeout(connect=limits.url_timeout_s, read=limits.url_timeout_s)
        if parts.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                address,
                port,
                timeout=timeout,
                retries=False,
                server_hostname=parts.hostname,
                assert_hostname=parts.hostname,
                cert_reqs="CERT_REQUIRED",
                ca_certs=certifi.where(),
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            response = pool.urlopen(
                "GET",
                target,
                headers={"Host": parts.netloc, "User-Agent": "owl-image-fetch"},
                redirect=False,
                preload_content=False,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as err:
            raise ImageError(f"could not fetch {_short(url)}: {type(err).__name__}") from None
        try:
            if response.status in (301, 302, 303, 307, 308):
                url = urljoin(url, response.headers.get("location", ""))
                continue
            if response.status != 200:
                raise ImageError(f"fetching {_short(url)} answered HTTP {response.status}")
            declared = int(response.headers.get("content-length") or 0)
            if declared > limits.max_bytes:
                raise ImageTooLarge(
                    f"{_short(url)} is {declared / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.0f} MiB"
                )
            body = bytearray()
            for chunk in response.stream(64 * 1024):
                body += chunk
                if len(body) > limits.max_bytes:
                    raise ImageTooLarge(f"{_short(url)} is larger than {limits.max_bytes / 2**20:.0f} MiB")
                if time.monotonic() > deadline:
                    raise ImageError(f"fetching {_short(url)} took longer than {limits.url_timeout_s:g} s")
            return bytes(body)
        except urllib3.exceptions.HTTPError as err:
            raise ImageError(f"could not fetch {_short(url)}: {type(err).__name__}") from None
        finally:
            response.release_conn()
            pool.close()
    raise ImageError(f"{_short(url)} redirected more than {limits.max_redirects} times")


# --- pixels --------------------------------------------------------------------------------------


class ImageProcessor:
    """Sources → (N, 3, S, S) float32: bicubic squash to S×S, /255, CLIP mean/std."""

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        *,
        allow_urls: bool = True,
        limits: ImageLimits = DEFAULT_LIMITS,
    ):
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.allow_urls = allow_urls
        self.limits = limits

    def load(self, source: Any) -> Image.Image:
        return load_image(source, allow_urls=self.allow_urls, limits=self.limits)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image → (3, S, S)."""
        square = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        data = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
        data = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float().div(255)
        return data.sub(self.mean).div(self.std)

    def __call__(self, sources: Any) -> torch.Tensor:
        """A source or a list of them → (N, 3, S, S); an empty list gives (0, 3, S, S)."""
        if isinstance(sources, (str, bytes, Path, Image.Image)):
            sources = [sources]
        tensors = [self.pixels(self.load(source)) for source in sources]
        if not tensors:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack(tensors)


SQUASH_WARN_RATIO = 2.0  # past this, the squash to a square distorts shapes beyond what training showed


def aspect_hint(path: str | Path, image_size: int) -> str | None:
    """A note for a picture more than twice as wide as tall (or as tall as wide), which the squash
    to ``image_size`` square stretches beyond what the model saw in training; None for any other
    picture, or a file that is not one or is too large to open (the engine reports those)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF says it is shown turned a quarter
                width, height = height, width
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    ratio = max(width, height) / max(1, min(width, height))
    if ratio <= SQUASH_WARN_RATIO:
        return None
    long, short = ("wide", "tall") if width > height else ("tall", "wide")
    return (
        f"{Path(path).name} is {ratio:.1f} times as {long} as it is {short} ({width} × {height} px). "
        f"The model squashes every picture to a {image_size} × {image_size} square, so this one arrives "
        f"stretched and its details may be misread; cropping it into parts gives better answers."
    )


# --- prompts -------------------------------------------------------------------------------------


def split_prompt(prompt: str) -> list[Segment]:
    """A prompt string with ``<image>`` placeholders → text chunks and image slots."""
    pieces = re.split(f"({re.escape(IMAGE_TOKEN)})", prompt)
    segments: list[Segment] = []
    count = 0
    for piece in pieces:
        if piece == IMAGE_TOKEN:
            segments.append(ImageSlot(count))
            count += 1
        elif piece:
            segments.append(piece)
    return segments


def encode_segments(segments: Iterable[Segment], tokenizer: Any, num_image_tokens: int) -> list[int]:
    """BOS, then every text chunk encoded on its own, and ``num_image_tokens`` slots per image."""
    ids = [tokenizer.bos_token_id]
    for segment in segments:
        if isinstance(segment, ImageSlot):
            ids.extend([IMAGE_TOKEN_ID] * num_image_tokens)
        else:
            ids.extend(tokenizer.encode(segment))
    return ids


def encode_prompt(
    prompt: str | Sequence[Segment], tokenizer: Any, num_image_tokens: int, num_images: int | None = None
) -> list[int]:
    """Prompt ids as the releases built them; with ``num_images`` the placeholder count is checked."""
    segments = split_prompt(prompt) if isinstance(prompt, str) else list(prompt)
    placeholders = sum(isinstance(s, ImageSlot) for s in segments)
    if num_images is not None and placeholders != num_images:
        raise PromptError(
            f"the prompt has {placeholders} {IMAGE_TOKEN} placeholders but {num_images} images were given"
        )
    return encode_segments(segments, tokenizer, num_image_tokens)


def image_spans(ids: Sequence[int], num_image_tokens: int) -> list[tuple[int, int]]:
    """(offset, length) of every image in prompt ids; each run of slots must hold whole images."""
    spans = []
    start = None
    for position, token in enumerate([*ids, None]):
        if token == IMAGE_TOKEN_ID and start is None:
            start = position
        elif token != IMAGE_TOKEN_ID and start is not None:
            length = position - start
            if length % num_image_tokens:
                raise PromptError(
                    f"a run of {length} image slots at {start} is not a multiple of {num_image_tokens}"
                )
            spans.extend((start + k, num_image_tokens) for k in range(0, length, num_image_tokens))
            start = None
    return spans
