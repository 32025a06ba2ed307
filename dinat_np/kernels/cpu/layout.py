"""Data movement and layouts on the CPU, where the backend's arrays are NumPy arrays: upload and download,
the weight layouts, zero-padding and cropping of feature maps, patch merging, the mean pool, and the
cache-line-aligned arrays the other ops write their outputs to."""

from __future__ import annotations

import math

import numpy as np

from ..common import conv_weight_layout, linear_weight_layout
from .gemm import PRODUCTS, PackedWeight, pack
from .simd import scratch


# The kernels read activations 16 floats (64 bytes) at a time, and a q/k/v row or a head within it starts
# at a multiple of 16 floats. NumPy's arrays start on any 16-byte boundary: from most of them every such
# load straddles two cache lines. The ops' outputs are allocated on 64-byte boundaries instead (and so is
# the attention kernels' scratch, see simd.scratch): faster attention at batch 8, batch 1 unchanged.
def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array of ``shape`` whose data starts on a 64-byte boundary."""
    return scratch(math.prod(shape)).reshape(shape)


def upload(array: np.ndarray) -> np.ndarray:
    """A float32 copy the kernels can read; a copy, so that the model holds no view of a mapped file."""
    return np.array(array, dtype=np.float32)


def download(array: np.ndarray | PackedWeight) -> np.ndarray:
    """The host NumPy array of a backend array (a packed weight's ``(in, out)`` matrix)."""
    return array.matrix() if isinstance(array, PackedWeight) else array


def linear_weight(weight: np.ndarray) -> np.ndarray | PackedWeight:
    """``(out, in)`` PyTorch weight -> ``(in, out)``, copied once at load (the products run slower on the
    transposed view): packed for the own product where it runs (gemm), else contiguous."""
    if PRODUCTS == "own":
        return pack(np.asarray(weight, np.float32).T)  # straight from PyTorch's layout into the panels
    return linear_weight_layout(weight)


def conv_weight(weight: np.ndarray) -> np.ndarray | PackedWeight:
    """``(out, in, k, k)`` PyTorch weight -> ``(k * k * in, out)`` rows in im2col (row, column, channel) order,
    packed for the own product where it runs."""
    matrix = conv_weight_layout(weight)
    return pack(matrix) if PRODUCTS == "own" else matrix


def pad_bottom_right(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pad ``(batch, h, w, channels)`` at the bottom and right to ``height x width``."""
    padded = np.zeros((x.shape[0], height, width, x.shape[3]), np.float32)
    padded[:, : x.shape[1], : x.shape[2]] = x
    return padded


def crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The top-left ``height x width`` of ``(batch, h, w, channels)``, contiguous."""
    return np.ascontiguousarray(x[:, :height, :width])


def patch_merging(x: np.ndarray) -> np.ndarray:
    """Each 2x2 block of ``(batch, h, w, c)`` as one position of ``4 * c`` channels: the neighbours at (row,
    column) offsets (0,0), (1,0), (0,1), (1,1) side by side, an odd ``h`` or ``w`` zero-padded at the
    bottom or right first: ``(batch, ceil(h/2), ceil(w/2), 4 * c)``."""
    batch, height, width, channels = x.shape
    merged = np.zeros((batch, (height + 1) // 2, (width + 1) // 2, 4, channels), np.float32)
    for k, (row, column) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        neighbours = x[:, row::2, column::2]
        merged[:, : neighbours.shape[1], : neighbours.shape[2], k] = neighbours
    return merged.reshape(merged.shape[:3] + (4 * channels,))


def mean_pool(x: np.ndarray) -> np.ndarray:
    """Average of ``(batch, height, width, channels)`` over the spatial axes."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1, dtype=np.float32)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """Pixel values ``(batch, channels, height, width)`` -> channels-last float32: a view of them when they
    are contiguous float32 (the first convolution reads it in place; see ``conv._DIRECT_MAX_CHANNELS``)."""
    return np.asarray(x, dtype=np.float32).transpose(0, 2, 3, 1)
