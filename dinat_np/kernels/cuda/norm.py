"""LayerNorm on the CUDA backend: a group of lanes per row (a warp for wide rows), 256 threads per block,
shared-memory sums."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda, float32

from ..common import Norm
from .device import LOCK, ONE, SIMULATOR, ZERO, empty, grid_blocks, reshaped

_LN_THREADS = 64 if SIMULATOR else 256  # (see device.THREADS)
_layer_norm_kernels: dict[int, Any] = {}


def _layer_norm_kernel(lanes: int) -> Any:
    """LayerNorm with ``lanes`` threads per row (fewer for narrow rows, so that lanes are not left idle)."""
    compiled = _layer_norm_kernels.get(lanes)
    if compiled is not None:
        return compiled
    rows_per_block = _LN_THREADS // lanes

    @cuda.jit
    def kernel(x, weight, bias, eps, out):
        # Each lane adds up its share of the row; then every lane reads the row's partial sums itself
        # (broadcast reads), which needs fewer barriers than a tree reduction.
        partial = cuda.shared.array((rows_per_block, lanes), dtype=float32)
        rows, channels = x.shape
        lane = cuda.threadIdx.x % lanes
        slot = cuda.threadIdx.x // lanes
        # Block-uniform loop over groups of rows: the barriers inside are reached by every thread.
        for first in range(cuda.blockIdx.x * rows_per_block, rows, cuda.gridDim.x * rows_per_block):
            row = first + slot
            active = row < rows
            total = ZERO
            if active:
                for c in range(lane, channels, lanes):
                    total += x[row, c]
            partial[slot, lane] = total
            cuda.syncthreads()
            total = ZERO
            for other in range(lanes):
                total += partial[slot, other]
            mean = total / float32(channels)
            cuda.syncthreads()  # every lane has read the sums before the slots are reused

            total = ZERO
            if active:
                for c in range(lane, channels, lanes):
                    centred = x[row, c] - mean
                    total += centred * centred
            partial[slot, lane] = total
            cuda.syncthreads()
            total = ZERO
            for other in range(lanes):
                total += partial[slot, other]
            inverse = ONE / math.sqrt(total / float32(channels) + eps)
            if active:
                for c in range(lane, channels, lanes):
                    out[row, c] = (x[row, c] - mean) * inverse * weight[c] + bias[c]
            cuda.syncthreads()  # the slots are reused by the next group of rows

    _layer_norm_kernels[lanes] = kernel
    return kernel


def layer_norm_rows(rows: Any, weight: Any, bias: Any, eps: float) -> Any:
    """LayerNorm of each row of the 2-D ``rows`` into a new array (the caller holds ``LOCK``)."""
    channels = rows.shape[1]
    out = empty(rows.shape)
    lanes = 32 if channels >= 32 else 8
    blocks = grid_blocks(rows.shape[0], _LN_THREADS // lanes)
    _layer_norm_kernel(lanes)[blocks, _LN_THREADS](rows, weight, bias, np.float32(eps), out)
    return out


def layer_norm(x: Any, norm: Norm) -> Any:
    """LayerNorm over the last axis of ``x`` (any leading shape)."""
    with LOCK:
        shape = tuple(x.shape)
        return reshaped(layer_norm_rows(reshaped(x, (-1, shape[-1])), norm.weight, norm.bias, norm.eps), shape)
