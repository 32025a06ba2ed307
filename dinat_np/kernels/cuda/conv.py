"""The convolutions of the CUDA backend: an im2col kernel, then the matrix product. The 3x3 stride-2 one
(DiNAT's tokenizer's and downsamplers') and the non-overlapping patch embedding (DiNAT_s's and the
isotropic models' tokenizer)."""

from __future__ import annotations

from typing import Any

from numba import cuda

from ..common import Conv, Linear, check_patch_size
from .device import LOCK, THREADS, ZERO, empty, grid_blocks
from .products import linear


@cuda.jit
def _im2col_kernel(x, cols):
    batch, height, width, channels = x.shape
    out_height = (height + 1) // 2
    out_width = (width + 1) // 2
    patch = 9 * channels
    total = batch * out_height * out_width * patch
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, total, stride):
        row = index // patch
        column = index % patch
        tap = column // channels
        c = column % channels
        oj = row % out_width
        rest = row // out_width
        oi = rest % out_height
        b = rest // out_height
        i = 2 * oi + tap // 3 - 1
        j = 2 * oj + tap % 3 - 1
        cols[row, column] = x[b, i, j, c] if 0 <= i < height and 0 <= j < width else ZERO


def conv3x3_stride2(x: Any, conv: Conv) -> Any:
    """3x3 convolution, stride 2, zero padding 1, on channels-last ``x``; returns channels-last."""
    with LOCK:
        batch, height, width, channels = x.shape
        out_height, out_width = (height + 1) // 2, (width + 1) // 2
        cols = empty((batch * out_height * out_width, 9 * channels))
        _im2col_kernel[grid_blocks(cols.size), THREADS](x, cols)
        y = linear(cols, Linear(conv.weight, conv.bias))  # the product with its bias fused in
        return y.reshape(batch, out_height, out_width, y.shape[1])


@cuda.jit
def _patches_kernel(x, patch_size, cols):
    # cols[row] = the patch under output pixel `row`, (row, column, channel) order, zero beyond the image
    batch, height, width, channels = x.shape
    patch = cols.shape[1]
    out_width = (width + patch_size - 1) // patch_size
    out_height = cols.shape[0] // (batch * out_width)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, cols.shape[0] * patch, stride):
        row = index // patch
        column = index % patch
        tap = column // channels
        c = column % channels
        oj = row % out_width
        rest = row // out_width
        oi = rest % out_height
        b = rest // out_height
        i = oi * patch_size + tap // patch_size
        j = oj * patch_size + tap % patch_size
        cols[row, column] = x[b, i, j, c] if i < height and j < width else ZERO


def patch_embedding(x: Any, conv: Conv, patch_size: int) -> Any:
    """Non-overlapping ``patch_size x patch_size`` convolution, stride ``patch_size``, on channels-last ``x``
    zero-padded at the bottom and right to a multiple of ``patch_size``; returns channels-last."""
    check_patch_size(patch_size)
    with LOCK:
        batch, height, width, channels = x.shape
        out_height, out_width = -(-height // patch_size), -(-width // patch_size)
        cols = empty((batch * out_height * out_width, patch_size * patch_size * channels))
        _patches_kernel[grid_blocks(cols.size), THREADS](x, patch_size, cols)
        y = linear(cols, Linear(conv.weight, conv.bias))
        return y.reshape(batch, out_height, out_width, y.shape[1])
