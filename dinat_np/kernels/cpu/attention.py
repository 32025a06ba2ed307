"""Neighborhood attention on the CPU: the fused op (two kernels: sliding windows, and whole dilation groups
where the map is exactly ``kernel_size * dilation`` across) and the unfused, reference-precision
``na_qk`` and ``na_av``; ViT-rpb's global attention, which is the whole-group kernel on a map one window across."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .. import common
from ..common import check_global_grid, check_qkv_bias, check_window
from .band import BOOL, FLOAT, INT, band, floats, integers
from .layout import aligned_empty
from .simd import (CACHE_LINE_FLOATS, FAST, LANES, add, broadcast, divide, floor, fma, fma_rows, lane_sum,
                   largest_lane, load, load_rows, maximum, multiply, power_of_two, prefetch, row_sums, scratch, splat,
                   store, store_rows, subtract, transpose, zeros)
from .threads import launching, thread_count

window_starts = njit(cache=True)(common.window_starts)  # NATTEN's border rule, compiled: the kernels call it


# exp(x) of 16 logits at once for the softmax (x <= 0), in float32 vector arithmetic (libm's expf is a
# scalar call): x = n ln2 + f with |f| <= ln2 / 2 (ln2 split in two parts for an exact reduction), e^f
# by its degree-7 Taylor polynomial (relative error < 1e-7 overall), 2^n from the exponent bits; inputs
# below -87 give e^-87 (1.6e-38), negligible next to the softmax maximum, which is exactly 1.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)  # few mantissa bits: n * _LN2_HIGH is exact
_LN2_LOW = np.float32(-2.12194440e-4)
_EXP_TAYLOR = tuple(np.float32(1.0 / math.factorial(k)) for k in range(8))


@njit(inline="always", **FAST)
def _exp_nonpositive(x):
    x = maximum(x, np.float32(-87.0))
    n = floor(fma(x, _LOG2E, np.float32(0.5)))
    f = fma(n, -_LN2_LOW, fma(n, -_LN2_HIGH, x))
    c0, c1, c2, c3, c4, c5, c6, c7 = _EXP_TAYLOR
    p = fma(fma(fma(fma(fma(fma(fma(c7, f, c6), f, c5), f, c4), f, c3), f, c2), f, c1), f, c0)
    return multiply(p, power_of_two(n))


@njit(inline="always", **FAST)
def _batch_row_head(task, height, heads):
    # one task per (batch, query row, head)
    return task // (height * heads), (task // heads) % height, task % heads


@njit(inline="always", **FAST)
def _add_weighted(weight, values, at, count, low, high):
    # (low, high) + weight * the channels values.flat[at:at + count], as two vectors
    return fma(weight, load(values, at, count), low), fma(weight, load(values, at + LANES, count - LANES), high)


@njit(inline="always", **FAST)
def _weighted_sum(probabilities, at, values, neighbour_at, value_at, window, count):
    # _weighted_window's loop, for one lane count
    low0 = low1 = low2 = low3 = high0 = high1 = high2 = high3 = splat(0.0)
    for n in range(0, window - 3, 4):
        u = np.uint64(n)  # unsigned: Numba adds no negative-index wrap-around
        low0, high0 = _add_weighted(broadcast(probabilities, at + n), values, neighbour_at[u] + value_at, count,
                                    low0, high0)
        low1, high1 = _add_weighted(broadcast(probabilities, at + n + 1), values,
                                    neighbour_at[u + np.uint64(1)] + value_at, count, low1, high1)
        low2, high2 = _add_weighted(broadcast(probabilities, at + n + 2), values,
                                    neighbour_at[u + np.uint64(2)] + value_at, count, low2, high2)
        low3, high3 = _add_weighted(broadcast(probabilities, at + n + 3), values,
                                    neighbour_at[u + np.uint64(3)] + value_at, count, low3, high3)
    for n in range(window // 4 * 4, window):
        low0, high0 = _add_weighted(broadcast(probabilities, at + n), values, neighbour_at[n] + value_at, count,
                                    low0, high0)
    return add(add(low0, low1), add(low2, low3)), add(add(high0, high1), add(high2, high3))


@njit(inline="always", **FAST)
def _weighted_window(probabilities, at, values, neighbour_at, value_at, window, count):
    # the sum over a window's neighbours n of probabilities[at + n] * values.flat[neighbour_at[n] + value_at:][:count]
    # as two vectors, four neighbours in flight (independent fma chains); both kernels' values
    # (neighbour_at: the sliding kernel's offsets from the window's first pixel, the whole-group kernel's
    # pixel offsets). Where the channels fill both vectors the loop gets the constant lane count: plain
    # loads, folded into the fmas.
    if count >= 2 * LANES:
        return _weighted_sum(probabilities, at, values, neighbour_at, value_at, window, 2 * LANES)
    return _weighted_sum(probabilities, at, values, neighbour_at, value_at, window, count)


_HEAD_DIM = 32  # every published DiNAT, NAT and isotropic model's channels per head


@njit(inline="always", **FAST)
def _block_dots(values, row_offsets, first, keys_at, query, whole_channels):
    # LANES rows of key channels times the query's whole vectors of channels, as a block (row_sums finishes
    # the dot products). Given a constant channel count the loop unrolls and each row's offset is loaded
    # once for all its channels, where a run-time count reloads the LANES offsets at every channel step
    # (they do not fit in the registers beside the block).
    totals = zeros()
    for t in range(0, whole_channels, LANES):  # a constant lane count: plain loads
        keys = load_rows(values, row_offsets, first, keys_at + t, LANES, LANES)
        totals = fma_rows(keys, load(query, t, LANES), totals)
    return totals


# The q/k/v product's bias is folded into the attention instead of being added by a pass of its own:
# softmax(scale (q + b_q).(k + b_k) + rpb) (v + b_v). The term scale (q + b_q).b_k is the same for
# every key of a query, and softmax is unchanged by a constant added to a query's logits, so b_k drops
# out exactly; the probabilities sum to 1, so b_v is added once to the output. Only b_q is added, to the
# query as it is read (the kernels get scale * b_q and b_v). This holds for zero-padded feature maps too:
# there HF's padded keys and values are b_k and b_v, here 0 + the same fold.
#
# Sliding windows, one task per (image, query row, head). A neighbour lies at the same offset from its
# window's first pixel for every query, so the offsets are computed once per task. A query's logits
# are LANES neighbours at a time: their key channels are the LANES rows of a block (one load each),
# multiplied by the query's channels, and row_sums finishes the LANES dot products with a few shuffles
# instead of a horizontal sum each. The probabilities then weight the neighbours' value channels, four
# neighbours in flight (independent fma chains). Consecutive queries overlap (see the step loop): faster
# than one query after the other. Loops over whole vectors of channels pass the constant LANES as the
# lane count, so that their loads are plain ones folded into the fmas (a run-time count chooses between a
# plain and a masked load at every step).
@band(floats(6, True), floats(1, True), floats(1, True), floats(1, True), integers(1, True), INT, INT, FLOAT, floats(5),
      floats(5), BOOL, INT, INT)
def _na_sliding_band(qkv, query_bias, value_bias, bias_table, neighbour_at, kernel_size, dilation, scale, out, attn,
                     store_attn, first_task, stop_task):
    # _na_fused's tasks first_task..stop_task - 1, on one thread
    batch, height, width, _, heads, head_dim = qkv.shape
    channels = heads * head_dim
    pixel_stride = 3 * channels
    window = kernel_size * kernel_size
    padded_window = (window + LANES - 1) // LANES * LANES
    # neighbours computed as blocks of LANES dot products up to here; a remainder of under four one by one
    blocks_end = window if window % LANES >= 4 else window // LANES * LANES
    whole_channels = head_dim // LANES * LANES  # channels in whole vectors; the rest in a masked one
    row_start, row_bias = window_starts(height, kernel_size, dilation)
    col_start, col_bias = window_starts(width, kernel_size, dilation)
    values = qkv.reshape(-1)
    context_out = out.reshape(-1)
    probabilities = scratch(2 * padded_window)  # two queries'; padding neighbours' stay -inf
    probabilities[:] = -np.inf
    query = scratch(head_dim)  # scaled, with its bias
    for task in range(first_task, stop_task):
        b, i, h = _batch_row_head(task, height, heads)
        head_at = h * head_dim
        # one head of a query row at a time: the next query's window is mostly this one's, still in L1.
        # Step s computes the logits of query s and finishes query s - 1 around them (its softmax before,
        # its values after), so that the core has the next query's independent work to run while the
        # softmax waits on its chains of latencies.
        largest = splat(-np.inf)
        inverse = np.float32(0.0)
        for step in range(width + 1):
            j = step - 1  # the query finished in this step
            at = (j & 1) * padded_window  # its probabilities; the next query's are in the other half
            if j >= 0:
                top = largest_lane(largest)
                total = splat(0.0)
                for n in range(0, window, LANES):
                    # the padding neighbours keep their -inf; their e^-87 in the total is negligible
                    p = _exp_nonpositive(subtract(load(probabilities, at + n, LANES), top))
                    store(probabilities, at + n, window - n, p)
                    total = add(total, p)
                inverse = np.float32(1.0) / lane_sum(total)
                if store_attn:
                    for n in range(window):
                        attn[b, h, i, j, n] = probabilities[at + n] * inverse

            if step < width:
                next_at = padded_window - at
                pixel = (b * height + i) * width + step
                window_at = ((b * height + row_start[i]) * width + col_start[step]) * pixel_stride
                bias_at = ((h * kernel_size + row_bias[i]) * kernel_size + col_bias[step]) * padded_window
                for t in range(0, head_dim, LANES):
                    count = min(LANES, head_dim - t)
                    store(query, t, count, fma(load(values, pixel * pixel_stride + head_at + t, count), scale,
                                               load(query_bias, head_at + t, count)))
                largest = splat(-np.inf)
                keys_at = window_at + channels + head_at
                if step + 2 < width:
                    # the key and value of the window's last neighbour two queries ahead: the one pixel that
                    # this row of queries reads first there (the others were read by the row above); and that
                    # query's own channels, which no other task of this thread read
                    ahead_at = ((b * height + row_start[i]) * width + col_start[step + 2]) * pixel_stride
                    ahead_at += neighbour_at[window - 1] + channels + head_at
                    query_ahead_at = (pixel + 2) * pixel_stride + head_at
                    for t in range(0, head_dim, CACHE_LINE_FLOATS):
                        prefetch(values, ahead_at + t)
                        prefetch(values, ahead_at + channels + t)
                        prefetch(values, query_ahead_at + t)
                for n in range(0, blocks_end, LANES):
                    if head_dim == _HEAD_DIM:
                        totals = _block_dots(values, neighbour_at, n, keys_at, query, _HEAD_DIM)
                    else:
                        totals = _block_dots(values, neighbour_at, n, keys_at, query, whole_channels)
                    if whole_channels < head_dim:
                        count = head_dim - whole_channels
                        keys = load_rows(values, neighbour_at, n, keys_at + whole_channels, LANES, count)
                        totals = fma_rows(keys, load(query, whole_channels, count), totals)
                    logits = add(row_sums(totals), load(bias_table, bias_at + n, LANES))
                    store(probabilities, next_at + n, LANES, logits)
                    largest = maximum(largest, logits)
                for n in range(blocks_end, window):  # a few last neighbours: one dot product each
                    total = splat(0.0)
                    for t in range(0, head_dim, LANES):
                        count = min(LANES, head_dim - t)
                        keys_at = window_at + neighbour_at[n] + channels + head_at + t
                        total = fma(load(query, t, count), load(values, keys_at, count), total)
                    logit = lane_sum(total) + bias_table[bias_at + n]
                    probabilities[next_at + n] = logit
                    largest = maximum(largest, logit)

            if j >= 0:
                pixel = (b * height + i) * width + j
                window_at = ((b * height + row_start[i]) * width + col_start[j]) * pixel_stride
                for t in range(0, head_dim, 2 * LANES):
                    count = head_dim - t  # lanes of the two vectors: min(LANES, count) and count - LANES
                    value_at = window_at + 2 * channels + head_at + t
                    low, high = _weighted_window(probabilities, at, values, neighbour_at, value_at, window, count)
                    out_at = pixel * channels + head_at + t
                    store(context_out, out_at, count, fma(low, inverse, load(value_bias, head_at + t, count)))
                    store(context_out, out_at + LANES, count - LANES,
                          fma(high, inverse, load(value_bias, head_at + t + LANES, count - LANES)))


@njit(parallel=True, **FAST)
def _na_fused(sliding_band, qkv, query_bias, value_bias, rpb, kernel_size, dilation, scale, out, attn, store_attn,
              parts):
    batch, height, width, _, heads, head_dim = qkv.shape
    channels = heads * head_dim
    pixel_stride = 3 * channels
    window = kernel_size * kernel_size
    padded_window = (window + LANES - 1) // LANES * LANES
    bias_size = 2 * kernel_size - 1

    # rpb as lane vectors: bias_table[((h * kernel_size + row_bias) * kernel_size + col_bias) * padded_window
    # + neighbour] for the bias indices of window_starts; -inf for the padding neighbours (never the maximum)
    bias_table = scratch(heads * window * padded_window)
    for task in prange(heads * kernel_size * kernel_size):
        h = task // (kernel_size * kernel_size)
        first_row = task // kernel_size % kernel_size
        first_column = task % kernel_size
        for n in range(0, padded_window, LANES):
            store(bias_table, task * padded_window + n, LANES, splat(-np.inf))
        for ki in range(kernel_size):
            at = (h * bias_size + first_row + ki) * bias_size + first_column
            for kj in range(0, kernel_size, LANES):
                count = min(LANES, kernel_size - kj)
                store(bias_table, task * padded_window + ki * kernel_size + kj, count, load(rpb, at + kj, count))

    # where each neighbour pixel starts in qkv, from the window's first pixel; the padding neighbours
    # repeat the last, so that whole blocks of 16 are read with no test per row
    neighbour_at = np.empty(padded_window, np.int64)
    for n in range(padded_window):
        neighbour = min(n, window - 1)
        neighbour_at[n] = (neighbour // kernel_size * width + neighbour % kernel_size) * dilation * pixel_stride

    tasks = batch * height * heads
    for part in prange(parts):
        sliding_band(qkv, query_bias, value_bias, bias_table, neighbour_at, kernel_size, dilation, scale, out, attn,
                     store_attn, tasks * part // parts, tasks * (part + 1) // parts)


@njit(inline="always", **FAST)
def _load_three(array, at, stride):
    return load(array, at, LANES), load(array, at + stride, LANES), load(array, at + 2 * stride, LANES)


@njit(inline="always", **FAST)
def _store_three(array, at, stride, vectors):
    store(array, at, LANES, vectors[0])
    store(array, at + stride, LANES, vectors[1])
    store(array, at + 2 * stride, LANES, vectors[2])


@njit(inline="always", **FAST)
def _fma_three(weights, value, totals):
    # totals[v] + weights[v] * value for three vectors of queries
    return fma(weights[0], value, totals[0]), fma(weights[1], value, totals[1]), fma(weights[2], value, totals[2])


@njit(inline="always", **FAST)
def _whole_group_layout(window):
    # (queries in vectors, their lanes: whole groups of three vectors, the bias table's query columns).
    # Odd squares leave 1 or 9 over whole vectors of 16: a remainder of under four queries (the 49th of a
    # 7x7 group, the 81st of a 9x9 one) is computed on its own instead of in a vector of padding lanes.
    vector_queries = window - window % LANES if window % LANES < 4 else window
    padded_queries = (vector_queries + 3 * LANES - 1) // (3 * LANES) * 3 * LANES
    return vector_queries, padded_queries, max(padded_queries, (window + LANES - 1) // LANES * LANES)


_LOCAL_ROWS = np.arange(LANES, dtype=np.int64) * LANES  # row offsets of a 16 x 16 block stored densely


# When a map is exactly kernel_size x dilation across (DiNAT's dilated layers and its last stage at
# 224x224: 11 of dinat-mini's 18 layers), every window is its whole dilation group: each group's
# kernel_size**2 queries attend to the same kernel_size**2 keys, a small dense attention. One task per
# (image, group, head) computes it with LANES queries per vector, three vectors at a time: each key or value
# channel is read once, by a broadcast, for 3 * LANES queries. The queries are transposed in registers to
# that layout (LANES x LANES blocks), and the context back to pixels on the way out. A remainder of under
# four queries (a 7x7 group's 49th) is computed on its own: in a vector of its own, all its other lanes
# would be padding, and every step would pay for them.
@band(floats(6, True), floats(1, True), floats(1, True), floats(1, True), INT, INT, FLOAT, floats(5), floats(5), BOOL,
      INT, INT)
def _na_whole_groups_band(qkv, query_bias, value_bias, bias_table, kernel_size, dilation, scale, out, attn, store_attn,
                          first_task, stop_task):
    # _na_whole_groups' tasks first_task..stop_task - 1, on one thread
    batch, height, width, _, heads, head_dim = qkv.shape
    channels = heads * head_dim
    window = kernel_size * kernel_size
    vector_queries, padded_queries, table_queries = _whole_group_layout(window)
    key_lanes = (window + LANES - 1) // LANES * LANES
    groups = dilation * dilation
    values = qkv.reshape(-1)
    context_out = out.reshape(-1)
    pixel_at = np.zeros(table_queries, np.int64)  # where the group's n-th pixel starts in qkv
    out_at = np.zeros(table_queries, np.int64)  # and in the output
    queries = scratch(padded_queries * head_dim)  # [query vector][channel][lane]
    logits = scratch(window * padded_queries)  # [key][query]
    context = scratch(padded_queries * head_dim)  # [query vector][channel][lane]
    query = scratch(head_dim)  # a query on its own, scaled, with its bias
    probabilities = scratch(key_lanes)  # its logits, then probabilities; the padding keys' stay -inf
    probabilities[:] = -np.inf
    for task in range(first_task, stop_task):
        b = task // (groups * heads)
        group_row = (task // heads) % groups // dilation
        group_col = (task // heads) % dilation
        h = task % heads
        key_channel = channels + h * head_dim  # where this head's key and value channels start in a pixel
        value_channel = 2 * channels + h * head_dim
        for n in range(window):
            row = group_row + n // kernel_size * dilation
            pixel = (b * height + row) * width + group_col + n % kernel_size * dilation
            pixel_at[n] = pixel * 3 * channels
            out_at[n] = pixel * channels + h * head_dim
            # the group's keys and values are scattered lines, from L3 or memory at batch 8: asked for all
            # at once here, they arrive while the queries are transposed
            for t in range(0, head_dim, CACHE_LINE_FLOATS):
                prefetch(values, pixel_at[n] + key_channel + t)
                prefetch(values, pixel_at[n] + value_channel + t)

        for v in range(padded_queries // LANES):
            rows = min(LANES, vector_queries - v * LANES)
            for t in range(0, head_dim, LANES):
                count = min(LANES, head_dim - t)
                block = load_rows(values, pixel_at, v * LANES, h * head_dim + t, rows, count)
                block = fma_rows(block, splat(scale), load(query_bias, h * head_dim + t, count))
                store_rows(queries, _LOCAL_ROWS, 0, (v * head_dim + t) * LANES, count, LANES, transpose(block))

        vector_stride = head_dim * LANES
        for v in range(0, padded_queries // LANES, 3):
            for key in range(0, window, 4):
                # a block past the last key recomputes that key, not stored
                key1 = min(key + 1, window - 1)
                key2 = min(key + 2, window - 1)
                key3 = min(key + 3, window - 1)
                logits0 = _load_three(bias_table, (h * window + key) * table_queries + v * LANES, LANES)
                logits1 = _load_three(bias_table, (h * window + key1) * table_queries + v * LANES, LANES)
                logits2 = _load_three(bias_table, (h * window + key2) * table_queries + v * LANES, LANES)
                logits3 = _load_three(bias_table, (h * window + key3) * table_queries + v * LANES, LANES)
                for t in range(head_dim):
                    vectors = _load_three(queries, (v * head_dim + t) * LANES, vector_stride)
                    logits0 = _fma_three(vectors, broadcast(values, pixel_at[key] + key_channel + t), logits0)
                    logits1 = _fma_three(vectors, broadcast(values, pixel_at[key1] + key_channel + t), logits1)
                    logits2 = _fma_three(vectors, broadcast(values, pixel_at[key2] + key_channel + t), logits2)
                    logits3 = _fma_three(vectors, broadcast(values, pixel_at[key3] + key_channel + t), logits3)
                _store_three(logits, key * padded_queries + v * LANES, LANES, logits0)
                if key + 1 < window:
                    _store_three(logits, key1 * padded_queries + v * LANES, LANES, logits1)
                if key + 2 < window:
                    _store_three(logits, key2 * padded_queries + v * LANES, LANES, logits2)
                if key + 3 < window:
                    _store_three(logits, key3 * padded_queries + v * LANES, LANES, logits3)

        for v in range(padded_queries // LANES):
            # two chains of maxima (odd and even keys), as each maximum waits on the one before
            top = load(logits, v * LANES, LANES)
            top_even = top
            for key in range(1, window - 1, 2):
                top = maximum(top, load(logits, key * padded_queries + v * LANES, LANES))
                top_even = maximum(top_even, load(logits, (key + 1) * padded_queries + v * LANES, LANES))
            top = maximum(maximum(top, top_even), load(logits, (window - 1) * padded_queries + v * LANES, LANES))
            total = splat(0.0)
            for key in range(window):
                p = _exp_nonpositive(subtract(load(logits, key * padded_queries + v * LANES, LANES), top))
                store(logits, key * padded_queries + v * LANES, LANES, p)
                total = add(total, p)
            inverse = divide(splat(1.0), total)
            for key in range(window):
                at = key * padded_queries + v * LANES
                store(logits, at, LANES, multiply(load(logits, at, LANES), inverse))
        if store_attn:
            for n in range(vector_queries):
                pixel = pixel_at[n] // (3 * channels)
                for key in range(window):
                    attn[b, h, pixel // width % height, pixel % width, key] = logits[key * padded_queries + n]

        for v in range(0, padded_queries // LANES, 3):
            for t in range(0, head_dim, 4):
                # a block past the last channel recomputes that channel, not stored
                t1 = min(t + 1, head_dim - 1)
                t2 = min(t + 2, head_dim - 1)
                t3 = min(t + 3, head_dim - 1)
                bias0 = splat(value_bias[h * head_dim + t])
                bias1 = splat(value_bias[h * head_dim + t1])
                bias2 = splat(value_bias[h * head_dim + t2])
                bias3 = splat(value_bias[h * head_dim + t3])
                context0 = (bias0, bias0, bias0)
                context1 = (bias1, bias1, bias1)
                context2 = (bias2, bias2, bias2)
                context3 = (bias3, bias3, bias3)
                for key in range(window):
                    p = _load_three(logits, key * padded_queries + v * LANES, LANES)
                    at = pixel_at[key] + value_channel
                    context0 = _fma_three(p, broadcast(values, at + t), context0)
                    context1 = _fma_three(p, broadcast(values, at + t1), context1)
                    context2 = _fma_three(p, broadcast(values, at + t2), context2)
                    context3 = _fma_three(p, broadcast(values, at + t3), context3)
                _store_three(context, (v * head_dim + t) * LANES, vector_stride, context0)
                if t + 1 < head_dim:
                    _store_three(context, (v * head_dim + t1) * LANES, vector_stride, context1)
                if t + 2 < head_dim:
                    _store_three(context, (v * head_dim + t2) * LANES, vector_stride, context2)
                if t + 3 < head_dim:
                    _store_three(context, (v * head_dim + t3) * LANES, vector_stride, context3)

        for v in range(padded_queries // LANES):
            rows = min(LANES, vector_queries - v * LANES)
            for t in range(0, head_dim, LANES):
                count = min(LANES, head_dim - t)
                block = transpose(load_rows(context, _LOCAL_ROWS, 0, (v * head_dim + t) * LANES, count, LANES))
                store_rows(context_out, out_at, v * LANES, t, rows, count, block)

        for n in range(vector_queries, window):  # the remainder, one query at a time, one dot product per key
            for t in range(0, head_dim, LANES):
                count = min(LANES, head_dim - t)
                store(query, t, count, fma(load(values, pixel_at[n] + h * head_dim + t, count), scale,
                                           load(query_bias, h * head_dim + t, count)))
            for key in range(window):
                total = splat(0.0)
                for t in range(0, head_dim, LANES):
                    count = min(LANES, head_dim - t)
                    total = fma(load(query, t, count), load(values, pixel_at[key] + key_channel + t, count), total)
                probabilities[key] = lane_sum(total) + bias_table[(h * window + key) * table_queries + n]
            top = splat(-np.inf)
            for key in range(0, window, LANES):
                top = maximum(top, load(probabilities, key, LANES))
            largest = largest_lane(top)
            total = splat(0.0)
            for key in range(0, window, LANES):
                p = _exp_nonpositive(subtract(load(probabilities, key, LANES), largest))
                store(probabilities, key, window - key, p)
                total = add(total, p)
            inverse = np.float32(1.0) / lane_sum(total)
            if store_attn:
                pixel = pixel_at[n] // (3 * channels)
                for key in range(window):
                    attn[b, h, pixel // width % height, pixel % width, key] = probabilities[key] * inverse
            for t in range(0, head_dim, 2 * LANES):
                count = head_dim - t  # lanes of the two vectors: min(LANES, count) and count - LANES
                low, high = _weighted_window(probabilities, 0, values, pixel_at, value_channel + t, window, count)
                at = out_at[n] + t
                store(context_out, at, count, fma(low, inverse, load(value_bias, h * head_dim + t, count)))
                store(context_out, at + LANES, count - LANES,
                      fma(high, inverse, load(value_bias, h * head_dim + t + LANES, count - LANES)))


@njit(parallel=True, **FAST)
def _na_whole_groups(whole_groups_band, qkv, query_bias, value_bias, flipped_rpb, kernel_size, dilation, scale, out,
                     attn, store_attn, parts):
    batch, height, width, _, heads, head_dim = qkv.shape
    window = kernel_size * kernel_size
    _, _, table_queries = _whole_group_layout(window)
    groups = dilation * dilation

    # rpb as lane vectors: bias_table[(h * window + key) * table_queries + query]. The bias of query (qi, qj)
    # towards key (ki, kj) is flipped_rpb[h, qi - ki + kernel_size - 1, qj - kj + kernel_size - 1]: a
    # query row's biases are contiguous there.
    bias_size = 2 * kernel_size - 1
    bias_table = scratch(heads * window * table_queries)
    for task in prange(heads * window):
        h = task // window
        key = task % window
        for query in range(0, table_queries, LANES):  # zero for the padding queries
            store(bias_table, task * table_queries + query, LANES, splat(0.0))
        for query_row in range(kernel_size):
            at = (h * bias_size + query_row - key // kernel_size + kernel_size - 1) * bias_size
            at += kernel_size - 1 - key % kernel_size
            for column in range(0, kernel_size, LANES):
                count = min(LANES, kernel_size - column)
                store(bias_table, task * table_queries + query_row * kernel_size + column, count,
                      load(flipped_rpb, at + column, count))

    tasks = batch * groups * heads
    for part in prange(parts):
        whole_groups_band(qkv, query_bias, value_bias, bias_table, kernel_size, dilation, scale, out, attn, store_attn,
                          tasks * part // parts, tasks * (part + 1) // parts)


@njit(parallel=True, **FAST)
def _na_qk(query, key, rpb, kernel_size, dilation, logits):
    batch, height, width, heads, head_dim = query.shape
    row_start, row_bias = window_starts(height, kernel_size, dilation)
    col_start, col_bias = window_starts(width, kernel_size, dilation)
    for task in prange(batch * height * heads):
        b, i, h = _batch_row_head(task, height, heads)
        for j in range(width):
            for ki in range(kernel_size):
                r = row_start[i] + ki * dilation
                for kj in range(kernel_size):
                    c = col_start[j] + kj * dilation
                    dot = 0.0  # float64: the unfused op is the reference-precision path
                    for t in range(head_dim):
                        dot += query[b, i, j, h, t] * key[b, r, c, h, t]
                    logits[b, h, i, j, ki * kernel_size + kj] = dot + rpb[h, row_bias[i] + ki, col_bias[j] + kj]


@njit(parallel=True, **FAST)
def _na_av(attn, value, kernel_size, dilation, out):
    batch, height, width, heads, head_dim = value.shape
    row_start, _ = window_starts(height, kernel_size, dilation)
    col_start, _ = window_starts(width, kernel_size, dilation)
    for task in prange(batch * height * heads):
        b, i, h = _batch_row_head(task, height, heads)
        accumulator = np.empty(head_dim, np.float64)
        for j in range(width):
            accumulator[:] = 0.0
            for ki in range(kernel_size):
                r = row_start[i] + ki * dilation
                for kj in range(kernel_size):
                    c = col_start[j] + kj * dilation
                    p = attn[b, h, i, j, ki * kernel_size + kj]
                    for t in range(head_dim):
                        accumulator[t] += p * value[b, r, c, h, t]
            for t in range(head_dim):
                out[b, i, j, h, t] = accumulator[t]


def neighborhood_attention(
    qkv: np.ndarray,
    rpb: np.ndarray,
    kernel_size: int,
    dilation: int,
    scale: float,
    return_attention: bool = False,
    qkv_bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Fused ``softmax(scale * q.k + rpb) @ v`` over each query's dilated window.

    ``qkv`` is ``(batch, height, width, 3, heads, head_dim)``: queries, keys and values side by side,
    as one matrix product of the input makes them. ``qkv_bias`` (``(3 * heads * head_dim,)``, the
    biases of that product side by side, or None) is applied here rather than by the product: the
    result is that of ``qkv + qkv_bias``. Returns the context ``(batch, height, width, heads,
    head_dim)`` and, when asked, the attention probabilities ``(batch, heads, height, width,
    kernel_size**2)`` (HF's layout).
    """
    check_window(qkv.shape[1], qkv.shape[2], kernel_size, dilation)
    return _attention(qkv, rpb, kernel_size, dilation, scale, return_attention, qkv_bias)


def global_attention(
    qkv: np.ndarray,
    rpb: np.ndarray,
    scale: float,
    return_attention: bool = False,
    qkv_bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Self-attention over every position of a square ``L x L`` map with ViT-rpb's relative position bias
    ``rpb`` ``(heads, 2L-1, 2L-1)``, read at the key-minus-query offset; ``qkv`` and ``qkv_bias`` as for
    :func:`neighborhood_attention`. Returns the context and, when asked, the probabilities ``(batch, heads,
    L * L, L * L)``.

    It is neighborhood attention with kernel size ``L`` (even or odd): every window is the whole map, and
    NATTEN's bias index is key minus query. The map is then exactly one window across, so the dense
    whole-group kernel runs it.
    """
    batch, height, width, _, heads, _ = qkv.shape
    length = check_global_grid(height, width, np.shape(rpb))
    context, attention = _attention(qkv, rpb, length, 1, scale, return_attention, qkv_bias)
    if attention is not None:
        attention = attention.reshape(batch, heads, length * length, length * length)
    return context, attention


_NO_ATTENTION = np.empty((0, 0, 0, 0, 0), np.float32)  # the kernels' attn when none is asked for: never written


def _attention(
    qkv: np.ndarray, rpb: np.ndarray, kernel_size: int, dilation: int, scale: float, return_attention: bool,
    qkv_bias: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    # the two ops above, once their window is checked. Few NumPy calls: each costs microseconds in a forward,
    # where the kernels have just filled the caches with other data.
    batch, height, width, _, heads, head_dim = qkv.shape
    channels = heads * head_dim
    if qkv_bias is None:
        query_bias = value_bias = np.zeros(channels, np.float32)  # one zero vector: the kernels only read it
    else:
        check_qkv_bias(np.shape(qkv_bias), heads, head_dim)
        # a copy, writable whatever was passed: a read-only value bias would be another type to the kernels
        qkv_bias = np.array(qkv_bias, dtype=np.float32)
        query_bias = qkv_bias[:channels] * np.float32(scale)
        value_bias = qkv_bias[2 * channels:]
    out = aligned_empty((batch, height, width, heads, head_dim))
    if return_attention:
        attn = np.empty((batch, heads, height, width, kernel_size * kernel_size), np.float32)
    else:
        attn = _NO_ATTENTION
    # the kernels address q/k/v, rpb and the output by flat offsets: C order
    qkv = np.ascontiguousarray(qkv, dtype=np.float32)
    rpb = np.ascontiguousarray(rpb, dtype=np.float32)
    with launching():
        if height == width == kernel_size * dilation:
            tasks = batch * dilation * dilation * heads
            _na_whole_groups(_na_whole_groups_band, qkv, query_bias, value_bias,
                             np.ascontiguousarray(rpb[:, ::-1, ::-1]), kernel_size, dilation, np.float32(scale), out,
                             attn, return_attention, min(thread_count(), tasks))
        else:
            _na_fused(_na_sliding_band, qkv, query_bias, value_bias, rpb, kernel_size, dilation, np.float32(scale), out,
                      attn, return_attention, min(thread_count(), batch * height * heads))
    return out, (attn if return_attention else None)


def na_qk(query: np.ndarray, key: np.ndarray, rpb: np.ndarray, kernel_size: int, dilation: int) -> np.ndarray:
    """Unfused ``q.k + rpb``: ``(batch, heads, height, width, kernel_size**2)`` from channels-last q and k."""
    batch, height, width, heads, _ = query.shape
    check_window(height, width, kernel_size, dilation)
    logits = np.empty((batch, heads, height, width, kernel_size * kernel_size), np.float32)
    with launching():
        _na_qk(query, key, rpb, kernel_size, dilation, logits)
    return logits


def na_av(attn: np.ndarray, value: np.ndarray, kernel_size: int, dilation: int) -> np.ndarray:
    """Unfused ``attn @ v`` with ``attn`` in HF layout and ``value`` channels-last; result channels-last."""
    check_window(value.shape[1], value.shape[2], kernel_size, dilation)
    out = np.empty(value.shape, np.float32)
    with launching():
        _na_av(attn, value, kernel_size, dilation, out)
    return out

