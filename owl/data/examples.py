"""The page's example pictures: synthetic scenes drawn by Owl itself (no third-party images).

python -m owl.data.examples   # rewrites static/examples/*.png and examples.json
"""

from __future__ import annotations

import json
from pathlib import Path

from owl.data.scenes import Scene, Shape, render

FOLDER = Path(__file__).resolve().parents[2] / "static" / "examples"

SCENES = {
    "red-circle.png": Scene("white", (Shape("circle", "red", "large", 0.35, 0.5, 0.17),)),
    "two-shapes.png": Scene(
        "grey",
        (
            Shape("star", "yellow", "large", 0.28, 0.35, 0.16),
            Shape("square", "blue", "small", 0.72, 0.7, 0.08),
        ),
    ),
    "three-shapes.png": Scene(
        "black",
        (
            Shape("triangle", "green", "large", 0.22, 0.3, 0.15),
            Shape("diamond", "orange", "small", 0.55, 0.72, 0.07),
            Shape("circle", "white", "small", 0.82, 0.3, 0.07),
        ),
    ),
    "pair-left.png": Scene("beige", (Shape("cross", "purple", "large", 0.5, 0.5, 0.16),)),
    "pair-right.png": Scene(
        "white",
        (Shape("circle", "blue", "large", 0.3, 0.4, 0.15), Shape("circle", "red", "small", 0.75, 0.7, 0.07)),
    ),
}

EXAMPLES = [
    {"text": "What colour is the circle?", "images": ["red-circle.png"]},
    {"text": "Describe this image in one sentence.", "images": ["two-shapes.png"]},
    {"text": "How many objects are there in the picture?", "images": ["three-shapes.png"]},
    {"text": "Where is the white object?", "images": ["three-shapes.png"]},
    {"text": "Which image has a blue circle?", "images": ["pair-left.png", "pair-right.png"]},
    {
        "text": "Do both images have the same number of objects?",
        "images": ["pair-left.png", "pair-right.png"],
    },
]


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, scene in SCENES.items():
        render(scene, width=320, height=240, antialias=True, noise=0.0, jpeg_quality=None).save(FOLDER / name)
    (FOLDER / "examples.json").write_text(json.dumps(EXAMPLES, indent=1) + "\n")
    print(f"wrote {len(SCENES)} pictures and {len(EXAMPLES)} examples to {FOLDER}")


if __name__ == "__main__":
    main()
