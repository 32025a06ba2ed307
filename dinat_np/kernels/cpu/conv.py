"""The convolutions on the CPU. The 3x3 stride-2 one (DiNAT's tokenizer's and downsamplers'): im2col patches
and a product, gathered and multiplied block by block, or computed directly where there are few input
channels. The patch embedding (DiNAT_s's and the isotropic models' tokenizer): a reshape and a product."""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from ..common import Conv, Linear, check_patch_size
from .band import INT, band, floats
from .layout import aligned_empty
from .products import (MIN_ROWS_PER_THREAD, NO_BIAS, NO_ROWS, kernel_sgemm, linear, panel_offset, product_block,
                       products_blas, weight_operand)
from .simd import FAST, LANES, broadcast, fma, load, splat, store
from .threads import launching, thread_count


_SHAPE = types.UniTuple(INT, 4)  # the input's shape, or its element strides (see _elements_and_strides)


@band(floats(1, True), _SHAPE, _SHAPE, INT, INT, floats(2), INT)
def _im2col_rows(x, shape, strides, first_pixel, count, cols, first_row):
    # cols[first_row + k] = the zero-padded 3x3 patch under output pixel first_pixel + k (flat over batch,
    # rows, columns), in (row, column, channel) order, for k < count. The input's element (b, i, j, c) is
    # x[b * strides[0] + i * strides[1] + j * strides[2] + c * strides[3]] (see _elements_and_strides).
    _, height, width, channels = shape
    batch_stride, row_stride, column_stride, channel_stride = strides
    out_height = (height + 1) // 2
    out_width = (width + 1) // 2
    for k in range(count):
        pixel = first_pixel + k
        row = first_row + k
        b = pixel // (out_height * out_width)
        oi = pixel // out_width % out_height
        oj = pixel % out_width
        for di in range(3):
            i = 2 * oi + di - 1
            for dj in range(3):
                j = 2 * oj + dj - 1
                base = (di * 3 + dj) * channels
                if 0 <= i < height and 0 <= j < width:
                    at = b * batch_stride + i * row_stride + j * column_stride
                    for c in range(channels):
                        # an unsigned index: no negative-index wrap-around, so the copy vectorises
                        cols[row, base + c] = x[np.uint64(at + c * channel_stride)]
                else:
                    for c in range(channels):
                        cols[row, base + c] = 0.0


@njit(parallel=True, **FAST)
def _im2col_3x3_s2(im2col_rows, parts, x, shape, strides, cols):
    pixels = cols.shape[0]
    for part in prange(parts):
        first = pixels * part // parts
        im2col_rows(x, shape, strides, first, pixels * (part + 1) // parts - first, cols, first)


# The patches of the tokenizer's second convolution are 29 MB at batch 8 (3136 x 288 floats per image),
# written once and read back once by the product. Here each thread takes its output pixels in blocks of
# this many, gathers a block's patches and multiplies them while they are still in L2, as products._mlp
# does with its hidden rows: faster at batch 8, batch 1 unchanged (blocks of 256-2048 pixels alike).
_CONV_BLOCK_ROWS = 512

# A convolution with few input channels (the first one's 3) runs directly instead. Its im2col product
# would have K = 9 x channels (27), far too short for BLAS's speed, and patches 2.25x the image's size.
# Here four output pixels of a row share each weight row, held in two vectors of output channels: faster
# up to 16 input channels. Both ways read the input in place through its strides, so the model's
# channels-first pixel values need no layout pass, and share one parallel kernel (a kernel of its own
# would lengthen the cold compile).
_DIRECT_MAX_CHANNELS = 16


@band(floats(1, True), _SHAPE, _SHAPE, floats(2, True), floats(1, True), floats(2), INT, INT)
def _direct_conv_rows(x, shape, strides, weight_cols, bias, y, first_row, stop_row):
    # output rows first_row..stop_row - 1 (flat over images and rows); x read as in _im2col_rows; weight_cols
    # in panels (see products), whose width is a multiple of the two vectors of output channels taken at once
    _, height, width, channels = shape
    batch_stride, row_stride, column_stride, channel_stride = strides
    out_height = (height + 1) // 2
    out_width = (width + 1) // 2
    out_channels = y.shape[1]
    panel_width = weight_cols.shape[1]
    weights = weight_cols.reshape(-1)
    out = y.reshape(-1)
    for row in range(first_row, stop_row):
        b, oi = row // out_height, row % out_height
        for oj in range(0, out_width, 4):
            for co in range(0, out_channels, 2 * LANES):
                count = out_channels - co  # lanes of the two vectors: min(16, count) and count - 16
                panel_at = panel_offset(weight_cols, 9 * channels, co)
                low0 = low1 = low2 = low3 = load(bias, co, count)
                high0 = high1 = high2 = high3 = load(bias, co + LANES, count - LANES)
                for di in range(3):
                    i = 2 * oi + di - 1
                    if i < 0 or i >= height:
                        continue
                    for dj in range(3):
                        # the first pixel's input column, the next ones' 2 apart; zero outside the image
                        # (the padding). Written out: an inlined helper for this test ran far slower.
                        j = 2 * oj + dj - 1
                        for c in range(channels):
                            w_at = panel_at + ((di * 3 + dj) * channels + c) * panel_width
                            w_low = load(weights, w_at, count)
                            w_high = load(weights, w_at + LANES, count - LANES)
                            at = b * batch_stride + i * row_stride + c * channel_stride
                            value = broadcast(x, at + j * column_stride) if 0 <= j < width else splat(0.0)
                            low0, high0 = fma(value, w_low, low0), fma(value, w_high, high0)
                            value = broadcast(x, at + (j + 2) * column_stride) if j + 2 < width else splat(0.0)
                            low1, high1 = fma(value, w_low, low1), fma(value, w_high, high1)
                            value = broadcast(x, at + (j + 4) * column_stride) if j + 4 < width else splat(0.0)
                            low2, high2 = fma(value, w_low, low2), fma(value, w_high, high2)
                            value = broadcast(x, at + (j + 6) * column_stride) if j + 6 < width else splat(0.0)
                            low3, high3 = fma(value, w_low, low3), fma(value, w_high, high3)
                at = (row * out_width + oj) * out_channels + co
                pixels = min(4, out_width - oj)
                store(out, at, count, low0)
                store(out, at + LANES, count - LANES, high0)
                if pixels > 1:
                    store(out, at + out_channels, count, low1)
                    store(out, at + out_channels + LANES, count - LANES, high1)
                if pixels > 2:
                    store(out, at + 2 * out_channels, count, low2)
                    store(out, at + 2 * out_channels + LANES, count - LANES, high2)
                if pixels > 3:
                    store(out, at + 3 * out_channels, count, low3)
                    store(out, at + 3 * out_channels + LANES, count - LANES, high3)


@njit(parallel=True, **FAST)
def _conv3x3_s2(direct_conv_rows, im2col_rows, sgemm, parts, x, shape, strides, weight_cols, bias, cols, y):
    # One task per thread. Without ``cols`` (few input channels) a band of output rows computed directly;
    # otherwise a band of output pixels, in blocks whose patches are gathered into this thread's block of
    # ``cols`` and multiplied by BLAS (``sgemm`` None: the direct way only, for want of BLAS).
    pixels, out_channels = y.shape
    rows = shape[0] * ((shape[1] + 1) // 2)
    block = cols.shape[0] // parts
    for part in prange(parts):
        if block == 0:
            direct_conv_rows(x, shape, strides, weight_cols, bias, y, rows * part // parts, rows * (part + 1) // parts)
        elif sgemm is not None:
            own = part * block  # this thread's first row in ``cols``
            stop = pixels * (part + 1) // parts
            for start in range(pixels * part // parts, stop, block):
                count = min(block, stop - start)
                im2col_rows(x, shape, strides, start, count, cols, own)
                product_block(sgemm, cols, own, weight_cols, y, start, count, 0, out_channels)
                if bias.size:
                    for row in range(start, start + count):
                        for c in range(out_channels):
                            y[row, c] += bias[c]


def _elements_and_strides(x: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The elements of channels-last ``x`` as a flat float32 array, and the element strides of its four
    axes: no copy for a contiguous array, nor for the channels-last view of a contiguous NCHW one."""
    x = np.asarray(x, dtype=np.float32)
    channels_first = x.transpose(0, 3, 1, 2)
    if not x.flags.c_contiguous and channels_first.flags.c_contiguous:
        return channels_first.reshape(-1), tuple(stride // 4 for stride in x.strides)
    x = np.ascontiguousarray(x)
    return x.reshape(-1), tuple(stride // 4 for stride in x.strides)


def conv3x3_stride2(x: np.ndarray, conv: Conv) -> np.ndarray:
    """3x3 convolution, stride 2, zero padding 1, on channels-last ``x``; returns contiguous channels-last.
    ``x`` may be the channels-last view of NCHW pixel values (as :func:`nchw_to_nhwc` gives): it is read
    in place."""
    weight_cols, bias = conv
    batch, height, width, channels = x.shape
    out_height, out_width = (height + 1) // 2, (width + 1) // 2
    pixels = batch * out_height * out_width
    out_channels = weight_cols.shape[1]
    parts = thread_count()
    elements, strides = _elements_and_strides(x)
    if channels <= _DIRECT_MAX_CHANNELS:
        bias = np.zeros(out_channels, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        y = aligned_empty((pixels, out_channels))
        with launching():
            _conv3x3_s2(_direct_conv_rows, _im2col_rows, kernel_sgemm(), min(parts, batch * out_height), elements,
                        x.shape, strides, weight_operand(weight_cols), bias, NO_ROWS, y)
        return y.reshape(batch, out_height, out_width, out_channels)
    few = pixels < MIN_ROWS_PER_THREAD * parts
    if kernel_sgemm() is None or few:  # no blocks: the patches whole, then the product (few pixels: it splits columns)
        cols = aligned_empty((pixels, 9 * channels))
        # launching() around the band run from Python too: a recording (compile.py) replaces both while it holds it
        with launching():
            if few:  # at most a few hundred patches, microseconds on this thread: no parallel kernel to compile
                _im2col_rows(elements, x.shape, strides, 0, pixels, cols, 0)
            else:
                _im2col_3x3_s2(_im2col_rows, parts, elements, x.shape, strides, cols)
        return linear(cols, Linear(weight_cols, bias)).reshape(batch, out_height, out_width, -1)
    bias = NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    block = min(_CONV_BLOCK_ROWS, -(-pixels // parts))
    cols = aligned_empty((parts * block, 9 * channels))
    y = aligned_empty((pixels, out_channels))
    with launching(products_blas()):
        _conv3x3_s2(_direct_conv_rows, _im2col_rows, kernel_sgemm(), parts, elements, x.shape, strides,
                    weight_operand(weight_cols), bias, cols, y)
    return y.reshape(batch, out_height, out_width, -1)


def patch_embedding(x: np.ndarray, conv: Conv, patch_size: int) -> np.ndarray:
    """Non-overlapping ``patch_size x patch_size`` convolution, stride ``patch_size``, on channels-last ``x``
    zero-padded at the bottom and right to a multiple of ``patch_size``; returns channels-last.

    The patches do not overlap, so their im2col rows are the (padded) image itself, reordered: a NumPy
    reshape and one product, nothing to compile.
    """
    check_patch_size(patch_size)
    batch, height, width, channels = x.shape
    rows, columns = -(-height // patch_size), -(-width // patch_size)
    padded = np.zeros((batch, rows * patch_size, columns * patch_size, channels), np.float32)
    padded[:, :height, :width] = x
    patches = padded.reshape(batch, rows, patch_size, columns, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
    y = linear(patches.reshape(batch * rows * columns, -1), Linear(conv.weight, conv.bias))
    return y.reshape(batch, rows, columns, y.shape[1])
