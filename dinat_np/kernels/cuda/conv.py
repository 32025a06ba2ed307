"""The 3x3 stride-2 convolution of the CUDA backend: an im2col kernel, then the matrix product."""

from __future__ import annotations

from typing import Any

from numba import cuda

from ..common import Conv, Linear
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
