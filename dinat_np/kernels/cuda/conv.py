"""The convolutions of the CUDA backend: an im2col kernel, then the matrix product. The 3x3 stride-2 one
(DiNAT's tokenizer's and downsamplers') and the non-overlapping patch embedding (DiNAT_s's and the
isotropic models' tokenizer)."""

from __future__ import annotations

from typing import Any

from numba import cuda

from ..common import Conv, Linear, check_patch_size
from .device import LOCK, THREADS, ZERO, empty, grid_blocks, reshaped
from .products import linear


@cuda.jit
def _im2col_kernel(x, kernel_size, stride, padding, out_width, cols):
    # cols[row] = the kernel_size x kernel_size patch under output pixel `row`, (row, column, channel)
    # order, its taps from `padding` above and left of stride * (output row, column); zero beyond the image
    batch, height, width, channels = x.shape
    patch = cols.shape[1]
    out_height = cols.shape[0] // (batch * out_width)
    start, stride_of_grid = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, cols.shape[0] * patch, stride_of_grid):
        row = index // patch
        column = index % patch
        tap = column // channels
        c = column % channels
        oj = row % out_width
        rest = row // out_width
        oi = rest % out_height
        b = rest // out_height
        i = oi * stride + tap // kernel_size - padding
        j = oj * stride + tap % kernel_size - padding
        cols[row, column] = x[b, i, j, c] if 0 <= i < height and 0 <= j < width else ZERO


def conv3x3_stride2(x: Any, conv: Conv) -> Any:
    """3x3 convolution, stride 2, zero padding 1, on channels-last ``x``; returns channels-last."""
    with LOCK:
        batch, height, width, channels = x.shape
        out_height, out_width = (height + 1) // 2, (width + 1) // 2
        cols = empty((batch * out_height * out_width, 9 * channels))
        _im2col_kernel[grid_blocks(cols.size), THREADS](x, 3, 2, 1, out_width, cols)
        y = linear(cols, Linear(conv.weight, conv.bias))  # the product with its bias fused in
        return reshaped(y, (batch, out_height, out_width, y.shape[1]))


def patch_embedding(x: Any, conv: Conv, patch_size: int) -> Any:
    """Non-overlapping ``patch_size x patch_size`` convolution, stride ``patch_size``, on channels-last ``x``
    zero-padded at the bottom and right to a multiple of ``patch_size``; returns channels-last."""
    check_patch_size(patch_size)
    with LOCK:
        batch, height, width, channels = x.shape
        out_height, out_width = -(-height // patch_size), -(-width // patch_size)
        cols = empty((batch * out_height * out_width, patch_size * patch_size * channels))
        # the zero padding is at the bottom and right only: none above and left of the taps
        _im2col_kernel[grid_blocks(cols.size), THREADS](x, patch_size, patch_size, 0, out_width, cols)
        y = linear(cols, Linear(conv.weight, conv.bias))
        return reshaped(y, (batch, out_height, out_width, y.shape[1]))
