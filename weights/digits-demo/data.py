"""Data set, split and image pipeline of the digits demo model (torch-free).

Shared by ``train.py`` (which needs torch) and ``tests/test_digits_demo.py`` (which must be
able to recompute the held-out split without torch).  Needs numpy, Pillow and scikit-learn
(for ``sklearn.datasets.load_digits``, the 8x8 handwritten digits that ship with it).

Pipeline of one digit, the same in training, evaluation and for the sample PNGs:
digit values 0..16 -> uint8 image (``value * 255 / 16``, rounded half up) -> PIL RGB image
-> the ``ViTImageProcessor`` described by ``preprocessor_config.json`` (bilinear resize to
32x32, rescale by 1/255, normalize with mean = std = 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: Seed of the train / held-out split (and of training).
SPLIT_SEED = 0
#: Fraction of every class kept out of training.
HELD_OUT_FRACTION = 0.2
#: The model folder (this file lives in it).
MODEL_DIR = Path(__file__).resolve().parent
#: Largest value in the scikit-learn digits (4x4 blocks of 0/1 pixels counted on an 8x8 grid).
DIGIT_MAX = 16


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 scikit-learn digits.

    Returns:
        ``(images, labels)``: ``images`` float64 ``(1797, 8, 8)`` with values 0..16,
        ``labels`` int64 ``(1797,)`` with values 0..9.
    """
    from sklearn.datasets import load_digits  # only needed here; keeps the import cheap

    digits = load_digits()
    return np.asarray(digits.images, dtype=np.float64), np.asarray(digits.target, dtype=np.int64)


def held_out_split(labels: np.ndarray, seed: int = SPLIT_SEED,
                   fraction: float = HELD_OUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train / held-out split.

    Per class, the images are permuted with ``numpy.random.default_rng(seed)`` (classes visited
    in increasing order, one generator for all) and the first ``round(fraction * count)`` go to
    the held-out set, so every class is represented in the same proportion.

    Args:
        labels: class of every image (``load_digits_arrays()[1]``).
        seed: generator seed.
        fraction: share of every class held out, in (0, 1).

    Returns:
        ``(train_indices, held_out_indices)``: sorted int64 index arrays into ``labels``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(members.size)]
        n_held = int(round(fraction * members.size))
        held_out.append(members[:n_held])
        train.append(members[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def digit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map digit values 0..16 to uint8 0..255 (``value * 255 / 16``, rounded half up)."""
    values = np.asarray(values, dtype=np.float64)
    if values.min() < 0 or values.max() > DIGIT_MAX:
        raise ValueError(f"digit values must lie in [0, {DIGIT_MAX}], got [{values.min()}, {values.max()}]")
    return np.floor(values * (255.0 / DIGIT_MAX) + 0.5).astype(np.uint8)


def digit_to_pil(values: np.ndarray) -> Image.Image:
    """One 8x8 digit as the RGB PIL image the preprocessor receives (gray replicated 3 times)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"a digit must be a 2-D array, got shape {values.shape}")
    return Image.fromarray(digit_to_uint8(values)).convert("RGB")


def sample_name(label: int) -> str:
    """File name of the shipped sample of class ``label`` (``samples/digit_<label>.png``)."""
    return f"digit_{int(label)}.png"
