"""Data movement and layout ops of the CUDA backend: upload/download, weight layouts, pad/crop, patch
merging, mean pooling, and the pixels' NCHW -> channels-last copy."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ..common import conv_weight_layout, linear_weight_layout
from .device import LOCK, THREADS, ZERO, empty, grid_blocks, reshaped, unravel_nhwc


def _is_device_array(array: Any) -> bool:
    return hasattr(array, "copy_to_host")  # numba's device arrays and the simulator's fakes alike


def upload(array: Any) -> Any:
    """A float32 device copy of a host array (device arrays are returned as they are)."""
    if _is_device_array(array):
        return array
    with LOCK:
        return cuda.to_device(np.ascontiguousarray(array, dtype=np.float32))


def download(array: Any) -> np.ndarray:
    """The host NumPy array of a backend array (waits for the kernels that write it)."""
    if isinstance(array, np.ndarray):
        return array
    with LOCK:
        return array.copy_to_host()


def linear_weight(weight: np.ndarray) -> Any:
    """``(out, in)`` PyTorch weight -> ``(in, out)`` on the device, so a product is ``x @ weight_t``."""
    return upload(linear_weight_layout(weight))


def conv_weight(weight: np.ndarray) -> Any:
    """``(out, in, k, k)`` PyTorch weight -> ``(k * k * in, out)`` on the device, rows in im2col order."""
    return upload(conv_weight_layout(weight))


@cuda.jit
def _nchw_to_nhwc_kernel(x, out):
    batch, height, width, channels = out.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * height * width * channels, stride):
        b, i, j, c = unravel_nhwc(index, height, width, channels)
        out[b, i, j, c] = x[b, c, i, j]


def nchw_to_nhwc(x: np.ndarray) -> Any:
    """Pixel values ``(batch, channels, height, width)`` (host) -> contiguous channels-last device array."""
    with LOCK:
        device = cuda.to_device(np.ascontiguousarray(x, dtype=np.float32))
        batch, channels, height, width = device.shape
        out = empty((batch, height, width, channels))
        _nchw_to_nhwc_kernel[grid_blocks(out.size), THREADS](device, out)
        return out


@cuda.jit
def _top_left_kernel(x, out):
    # The top-left corner of x, zero where out reaches beyond it: a crop or a bottom-right pad.
    batch, height, width, channels = out.shape
    in_height, in_width = x.shape[1], x.shape[2]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * height * width * channels, stride):
        b, i, j, c = unravel_nhwc(index, height, width, channels)
        out[b, i, j, c] = x[b, i, j, c] if i < in_height and j < in_width else ZERO


def _top_left(x: Any, height: int, width: int) -> Any:
    with LOCK:
        out = empty((x.shape[0], height, width, x.shape[3]))
        _top_left_kernel[grid_blocks(out.size), THREADS](x, out)
        return out


def pad_bottom_right(x: Any, height: int, width: int) -> Any:
    """Zero-pad ``(batch, h, w, channels)`` at the bottom and right to ``height x width``."""
    return _top_left(x, height, width)


def crop(x: Any, height: int, width: int) -> Any:
    """The top-left ``height x width`` of ``(batch, h, w, channels)``, contiguous."""
    return _top_left(x, height, width)


@cuda.jit
def _patch_merging_kernel(x, out):
    # out[b, i, j, k * channels + c] = x[b, 2i + k % 2, 2j + k // 2, c]: neighbours (0,0), (1,0), (0,1), (1,1)
    batch, height, width, channels = x.shape
    out_height, out_width, merged = out.shape[1], out.shape[2], out.shape[3]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * out_height * out_width * merged, stride):
        b, i, j, channel = unravel_nhwc(index, out_height, out_width, merged)
        k = channel // channels
        row = 2 * i + k % 2
        column = 2 * j + k // 2
        out[b, i, j, channel] = x[b, row, column, channel % channels] if row < height and column < width else ZERO


def patch_merging(x: Any) -> Any:
    """Each 2x2 block of ``(batch, h, w, c)`` as one position of ``4 * c`` channels: the neighbours at (row,
    column) offsets (0,0), (1,0), (0,1), (1,1) side by side, an odd ``h`` or ``w`` zero-padded at the
    bottom or right first: ``(batch, ceil(h/2), ceil(w/2), 4 * c)``."""
    with LOCK:
        batch, height, width, channels = x.shape
        out = empty((batch, (height + 1) // 2, (width + 1) // 2, 4 * channels))
        _patch_merging_kernel[grid_blocks(out.size), THREADS](x, out)
        return out


@cuda.jit
def _mean_pool_kernel(x, out):
    batch, positions, channels = x.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * channels, stride):
        b = index // channels
        c = index % channels
        total = 0.0  # float64: thousands of positions summed once per image
        for p in range(positions):
            total += x[b, p, c]
        out[b, c] = total / positions


def mean_pool(x: Any) -> Any:
    """Average of ``(batch, height, width, channels)`` over the spatial axes -> ``(batch, channels)``."""
    with LOCK:
        shape = tuple(x.shape)  # the simulator's shapes refuse negative indices
        batch, channels = shape[0], shape[-1]
        out = empty((batch, channels))
        _mean_pool_kernel[grid_blocks(batch * channels), THREADS](reshaped(x, (batch, -1, channels)), out)
        return out
