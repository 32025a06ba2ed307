"""Test images: real photographs (scikit-image) written as files, seeded random images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_photos(folder: Path, count: int = 3) -> list[Path]:
    """Small real photographs (scikit-image) as JPEG/PNG files."""
    import skimage.data

    sources = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.fromarray(sources[i % len(sources)])
        image.thumbnail((96, 96))
        path = folder / (f"photo{i}.jpg" if i % 2 == 0 else f"photo{i}.png")
        image.save(path)
        paths.append(path)
    return paths


def random_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
