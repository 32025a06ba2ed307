"""LayerNorm on the CPU: the op, and the row normalisation that the products' epilogues also apply."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..common import Norm
from .layout import aligned_empty
from .simd import FAST
from .threads import launching


@njit(inline="always", **FAST)
def normalise_row(x, row, weight, bias, eps, out):
    # out[row] = LayerNorm(x[row]) with weight, bias and eps. Its sums are float32: they vectorise twice
    # as wide as float64 ones; with the two-pass variance the error is that of PyTorch's float32 LayerNorm.
    channels = x.shape[1]
    total = np.float32(0.0)
    for c in range(channels):
        total += x[row, c]
    mean = total / np.float32(channels)
    variance = np.float32(0.0)
    for c in range(channels):
        centred = x[row, c] - mean
        variance += centred * centred
    inverse = np.float32(1.0 / math.sqrt(variance / channels + eps))
    for c in range(channels):
        out[row, c] = (x[row, c] - mean) * inverse * weight[c] + bias[c]


@njit(parallel=True, **FAST)
def _layer_norm(x, weight, bias, eps, out):
    for row in prange(x.shape[0]):
        normalise_row(x, row, weight, bias, eps, out)


def layer_norm(x: np.ndarray, norm: Norm) -> np.ndarray:
    """LayerNorm over the last axis of ``x`` (any leading shape)."""
    rows = x.reshape(-1, x.shape[-1])
    out = aligned_empty(rows.shape)
    with launching():
        _layer_norm(rows, norm.weight, norm.bias, norm.eps, out)
    return out.reshape(x.shape)
