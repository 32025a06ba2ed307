"""CPU backend: Numba kernels for every op of the forward pass; matrix products called from inside the
kernels, the own (``dinat_np.kernels.cpu_gemm``) or NumPy's OpenBLAS (``cpu_blas``), else by NumPy.

Layout conventions shared by all backends (see ``dinat_np.kernels``):
- activations are channels-last, ``(rows, channels)`` or ``(batch, height, width, channels)``;
- queries, keys and values are ``(batch, height, width, heads, head_dim)``, C-contiguous float32;
- linear weights are stored transposed, ``(in_features, out_features)``, so a product is ``x @ weight_t``;
- 3x3 convolution weights are stored as ``(3 * 3 * in_channels, out_channels)`` in (row, column, channel)
  order, matching the im2col patches below.

Threading (which Numba layer, and why; fork and thread safety): see ``dinat_np.kernels.cpu_threading``.
Every parallel kernel launch goes through its ``launching()``. Importing this module raises glibc's
malloc thresholds (``dinat_np.kernels.cpu_malloc``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numba
import numpy as np
from numba import njit, prange

from . import cpu_gemm
from .cpu_blas import NO_TRANS, NUMPY_OPENBLAS, ROW_MAJOR
from .cpu_malloc import raise_thresholds
from .cpu_simd import (FAST, LANES, add, broadcast, divide, floor, fma, fma_rows, lane_sum, largest_lane, load,
                       load_rows, maximum, multiply, power_of_two, row_sums, scratch, splat, store, store_rows,
                       subtract, transpose, zeros)
from . import common
from .common import (Conv, Epilogue, Linear, Norm, activation_code, check_qkv_bias, check_window, conv_weight_layout,
                     linear_weight_layout)
from .cpu_threading import launching

window_starts = njit(cache=True)(common.window_starts)  # NATTEN's border rule, called from the kernels



# The parallel kernels keep their prange bodies small: a thread's share of the work is a call of a plain
# njit function (a band of tasks, rows or pixels), and code shared by kernels is such a function rather
# than inlined. Numba copies and re-analyses a prange body several times over, inlined code included, and
# compiles an inlined helper once per call site: split this way, a cold compile of dinat-mini's kernels
# took 17.1-18.7 s instead of 21.7-24.1 (three interleaved pairs), with the same run time.

_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


# ---------------------------------------------------------------------------------------------------
# Activations on cache-line boundaries
# ---------------------------------------------------------------------------------------------------
# The kernels read activations 16 floats (64 bytes) at a time, and a q/k/v row or a head within it starts
# at a multiple of 16 floats. NumPy's arrays start on any 16-byte boundary (in a batch-8 forward, 3 of
# the 9 stage-1 q/k/v arrays started on a cache line): from the others every such load straddles two
# lines. The ops' outputs are allocated on 64-byte boundaries instead, and so is the attention kernels'
# scratch (Numba's own arrays start on 32-byte boundaries: 2-3% of an attention call). dinat-mini at
# batch 8, five interleaved runs of whole forwards: 0.7-1.8% faster (attention 4.45 -> 4.07 ms per
# image, mostly the sliding-window layers); batch 1 unchanged.
def _empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array of ``shape`` whose data starts on a 64-byte boundary."""
    return scratch(math.prod(shape)).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Neighborhood geometry (NATTEN's rule)
# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# Neighborhood attention
# ---------------------------------------------------------------------------------------------------
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


# The q/k/v product's bias is folded into the attention instead of being added by a pass of its own:
# softmax(scale (q + b_q).(k + b_k) + rpb) (v + b_v). The term scale (q + b_q).b_k is the same for
# every key of a query, and softmax is unchanged by a constant added to a query's logits, so b_k drops
# out exactly; the probabilities sum to 1, so b_v is added once to the output. Only b_q is added, to the
# query as it is read (the kernels get scale * b_q and b_v). This holds for zero-padded feature maps too:
# there HF's padded keys and values are b_k and b_v, here 0 + the same fold.
#
# Sliding windows, one task per (image, query row, head). A neighbour lies at the same offset from its
# window's first pixel for every query, so the offsets are computed once per task. A query's logits
# are 16 neighbours at a time: their key channels are 16 rows of a block (one load each), multiplied by
# the query's channels, and row_sums finishes the 16 dot products with a few shuffles instead of a
# horizontal sum each. The probabilities then weight the neighbours' value channels, four neighbours in
# flight (independent fma chains). Consecutive queries overlap (see the step loop): 7-13% faster per call
# than one query after the other (dinat-mini's three sliding-window shapes at batch 8).
@njit(**FAST)
def _na_sliding_band(qkv, query_bias, value_bias, bias_table, neighbour_at, kernel_size, dilation, scale, out, attn,
                     store_attn, first_task, stop_task):
    # _na_fused's tasks first_task..stop_task - 1, on one thread
    batch, height, width, _, heads, head_dim = qkv.shape
    channels = heads * head_dim
    pixel_stride = 3 * channels
    window = kernel_size * kernel_size
    padded_window = (window + LANES - 1) // LANES * LANES
    # neighbours computed as blocks of 16 dot products up to here; a remainder of under four one by one
    blocks_end = window if window % LANES >= 4 else window // LANES * LANES
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
                for n in range(0, blocks_end, LANES):
                    totals = zeros()
                    for t in range(0, head_dim, LANES):
                        count = min(LANES, head_dim - t)
                        keys = load_rows(values, neighbour_at[n:], window_at + channels + head_at + t, LANES, count)
                        totals = fma_rows(keys, load(query, t, count), totals)
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
                    count = head_dim - t  # lanes of the two vectors: min(16, count) and count - 16
                    value_at = window_at + 2 * channels + head_at + t
                    low0 = low1 = low2 = low3 = high0 = high1 = high2 = high3 = splat(0.0)
                    for n in range(0, window - 3, 4):
                        u = np.uint64(n)  # unsigned: Numba adds no negative-index wrap-around (~5% of the kernel)
                        low0, high0 = _add_weighted(broadcast(probabilities, at + n), values,
                                                    neighbour_at[u] + value_at, count, low0, high0)
                        low1, high1 = _add_weighted(broadcast(probabilities, at + n + 1), values,
                                                    neighbour_at[u + np.uint64(1)] + value_at, count, low1, high1)
                        low2, high2 = _add_weighted(broadcast(probabilities, at + n + 2), values,
                                                    neighbour_at[u + np.uint64(2)] + value_at, count, low2, high2)
                        low3, high3 = _add_weighted(broadcast(probabilities, at + n + 3), values,
                                                    neighbour_at[u + np.uint64(3)] + value_at, count, low3, high3)
                    for n in range(window // 4 * 4, window):
                        low0, high0 = _add_weighted(broadcast(probabilities, at + n), values,
                                                    neighbour_at[n] + value_at, count, low0, high0)
                    out_at = pixel * channels + head_at + t
                    low = add(add(low0, low1), add(low2, low3))
                    high = add(add(high0, high1), add(high2, high3))
                    store(context_out, out_at, count, fma(low, inverse, load(value_bias, head_at + t, count)))
                    store(context_out, out_at + LANES, count - LANES,
                          fma(high, inverse, load(value_bias, head_at + t + LANES, count - LANES)))


@njit(parallel=True, **FAST)
def _na_fused(qkv, query_bias, value_bias, rpb, kernel_size, dilation, scale, out, attn, store_attn, parts):
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
        _na_sliding_band(qkv, query_bias, value_bias, bias_table, neighbour_at, kernel_size, dilation, scale, out, attn,
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
# (image, group, head) computes it with 16 queries per vector, three vectors at a time: each key or value
# channel is read once, by a broadcast, for 48 queries. The queries are transposed in registers to that
# layout (16 x 16 blocks), and the context back to pixels on the way out. A 7x7 group's 49th query is
# computed on its own: in a fourth vector, 15 of its 16 lanes were padding, and every step paid for them
# (dinat-mini's four whole-group shapes at batch 8: 10-15% faster per call, in alternation).
@njit(**FAST)
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
        for n in range(window):
            row = group_row + n // kernel_size * dilation
            pixel = (b * height + row) * width + group_col + n % kernel_size * dilation
            pixel_at[n] = pixel * 3 * channels
            out_at[n] = pixel * channels + h * head_dim

        for v in range(padded_queries // LANES):
            rows = min(LANES, vector_queries - v * LANES)
            for t in range(0, head_dim, LANES):
                count = min(LANES, head_dim - t)
                block = load_rows(values, pixel_at[v * LANES:], h * head_dim + t, rows, count)
                block = fma_rows(block, splat(scale), load(query_bias, h * head_dim + t, count))
                store_rows(queries, _LOCAL_ROWS, (v * head_dim + t) * LANES, count, LANES, transpose(block))

        vector_stride = head_dim * LANES
        key_channel = channels + h * head_dim
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
            # two chains of maxima (odd and even keys), as each maximum waits on the one before: 2-4% per call
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

        value_channel = 2 * channels + h * head_dim
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
                block = transpose(load_rows(context, _LOCAL_ROWS, (v * head_dim + t) * LANES, count, LANES))
                store_rows(context_out, out_at[v * LANES:], t, rows, count, block)

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
                count = head_dim - t  # lanes of the two vectors: min(16, count) and count - 16
                low0 = low1 = high0 = high1 = splat(0.0)  # even and odd keys: two chains of fmas
                for key in range(0, window - 1, 2):
                    low0, high0 = _add_weighted(broadcast(probabilities, key), values,
                                                pixel_at[key] + value_channel + t, count, low0, high0)
                    low1, high1 = _add_weighted(broadcast(probabilities, key + 1), values,
                                                pixel_at[key + 1] + value_channel + t, count, low1, high1)
                for key in range(window // 2 * 2, window):
                    low0, high0 = _add_weighted(broadcast(probabilities, key), values,
                                                pixel_at[key] + value_channel + t, count, low0, high0)
                at = out_at[n] + t
                store(context_out, at, count,
                      fma(add(low0, low1), inverse, load(value_bias, h * head_dim + t, count)))
                store(context_out, at + LANES, count - LANES,
                      fma(add(high0, high1), inverse, load(value_bias, h * head_dim + t + LANES, count - LANES)))


@njit(parallel=True, **FAST)
def _na_whole_groups(qkv, query_bias, value_bias, flipped_rpb, kernel_size, dilation, scale, out, attn,
                     store_attn, parts):
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
        _na_whole_groups_band(qkv, query_bias, value_bias, bias_table, kernel_size, dilation, scale, out, attn,
                              store_attn, tasks * part // parts, tasks * (part + 1) // parts)


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
    batch, height, width, _, heads, head_dim = qkv.shape
    check_window(height, width, kernel_size, dilation)
    channels = heads * head_dim
    query_bias = np.zeros(channels, np.float32)
    value_bias = np.zeros(channels, np.float32)
    if qkv_bias is not None:
        check_qkv_bias(np.shape(qkv_bias), heads, head_dim)
        qkv_bias = np.asarray(qkv_bias, dtype=np.float32)
        query_bias[:] = qkv_bias[:channels] * np.float32(scale)
        value_bias[:] = qkv_bias[2 * channels:]
    out = _empty((batch, height, width, heads, head_dim))
    shape = (batch, heads, height, width, kernel_size * kernel_size) if return_attention else (0, 0, 0, 0, 0)
    attn = np.empty(shape, np.float32)
    # the kernels address q/k/v, rpb and the output by flat offsets: C order
    qkv = np.ascontiguousarray(qkv, dtype=np.float32)
    rpb = np.ascontiguousarray(rpb, dtype=np.float32)
    with launching():
        if height == width == kernel_size * dilation:
            tasks = batch * dilation * dilation * heads
            _na_whole_groups(qkv, query_bias, value_bias, np.ascontiguousarray(rpb[:, ::-1, ::-1]), kernel_size,
                             dilation, np.float32(scale), out, attn, return_attention,
                             min(numba.get_num_threads(), tasks))
        else:
            _na_fused(qkv, query_bias, value_bias, rpb, kernel_size, dilation, np.float32(scale), out, attn,
                      return_attention, min(numba.get_num_threads(), batch * height * heads))
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


# ---------------------------------------------------------------------------------------------------
# Normalisation, activations and epilogues
# ---------------------------------------------------------------------------------------------------
@njit(inline="always", **FAST)
def _normalise_row(x, row, weight, bias, eps, out):
    # float32 sums: they vectorise twice as wide as float64 ones (a row's arithmetic 2-3x faster on
    # the model's shapes); with the two-pass variance the error is that of PyTorch's float32 LayerNorm.
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
        _normalise_row(x, row, weight, bias, eps, out)


def layer_norm(x: np.ndarray, norm: Norm) -> np.ndarray:
    """LayerNorm over the last axis of ``x`` (any leading shape)."""
    rows = x.reshape(-1, x.shape[-1])
    out = _empty(rows.shape)
    with launching():
        _layer_norm(rows, norm.weight, norm.bias, norm.eps, out)
    return out.reshape(x.shape)


# Abramowitz & Stegun 7.1.28: erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0, |error| <= 3e-7.
# Unlike libm's erf it is plain float32 arithmetic, so the exact-GELU epilogue vectorises (about 5x faster).
_ERF_A = tuple(np.float32(a) for a in (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638))


@njit(inline="always", **FAST)
def _erf(x):
    a1, a2, a3, a4, a5, a6 = _ERF_A
    s = abs(x)
    p = np.float32(1.0) + s * (a1 + s * (a2 + s * (a3 + s * (a4 + s * (a5 + s * a6)))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return math.copysign(np.float32(1.0) - np.float32(1.0) / p, x)


@njit(inline="always", **FAST)
def _activate(x, activation):
    if activation == 1:
        return np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(_SQRT_HALF)))
    if activation == 2:
        return 0.5 * x * (1.0 + math.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    if activation == 3:
        return max(x, 0.0)
    if activation == 4:
        return _SELU_SCALE * (x if x > 0.0 else _SELU_ALPHA * (math.exp(x) - 1.0))
    return x


# ---------------------------------------------------------------------------------------------------
# Matrix products with their epilogues: computed inside the kernels by an sgemm, cpu_gemm's own or NumPy's
# OpenBLAS (see cpu_blas for why it is called from here), so that a thread applies the epilogue to rows
# it has just written; else by NumPy's matmul first. Which: cpu_gemm.PRODUCTS.
# ---------------------------------------------------------------------------------------------------
_BLAS = NUMPY_OPENBLAS
_PRODUCTS = cpu_gemm.PRODUCTS  # "own", "openblas" or "numpy" (the tests switch it)


def _sgemm():
    """The kernels' ``sgemm`` argument: cpu_gemm's, OpenBLAS's, or None (NumPy multiplies first)."""
    return cpu_gemm.sgemm() if _PRODUCTS == "own" else _BLAS.sgemm if _PRODUCTS == "openblas" else None


def _products_launch():
    """The context of a kernel launch that multiplies: OpenBLAS kept single-threaded where it is used."""
    return _BLAS.single_threaded() if _PRODUCTS == "openblas" else nullcontext()


_EPILOGUE_NONE, _EPILOGUE_ACTIVATION = int(Epilogue.NONE), int(Epilogue.ACTIVATION)
_EPILOGUE_RESIDUAL, _EPILOGUE_RESIDUAL_NORM = int(Epilogue.RESIDUAL), int(Epilogue.RESIDUAL_NORM)


@njit(inline="always", **FAST)
def _product_block(sgemm, x, x_row, weight_t, y, y_row, rows, first_col, stop_col):
    # y[y_row : y_row + rows, cols] = x[x_row : x_row + rows] @ weight_t[:, cols] by one sgemm call on this
    # thread (OpenBLAS is kept single-threaded meanwhile). Pointers are computed, not sliced: a view
    # would be counted and freed.
    in_features = x.shape[1]
    out_features = y.shape[1]
    sgemm(
        ROW_MAJOR, NO_TRANS, NO_TRANS, rows, stop_col - first_col, in_features, np.float32(1.0),
        x.ctypes.data + x_row * in_features * 4, in_features, weight_t.ctypes.data + first_col * 4,
        out_features, np.float32(0.0), y.ctypes.data + (y_row * out_features + first_col) * 4, out_features,
    )


@njit(**FAST)
def _bias_activation_rows(y, first, stop, bias, activation):
    for row in range(first, stop):
        for c in range(y.shape[1]):
            y[row, c] = _activate(y[row, c] + bias[c], activation)


@njit(**FAST)
def _residual_rows(y, first, stop, bias, scale, residual, normalise, norm_weight, norm_bias, eps, normed):
    for row in range(first, stop):
        for c in range(y.shape[1]):
            y[row, c] = residual[row, c] + scale[c] * (y[row, c] + bias[c])
        if normalise:
            _normalise_row(y, row, norm_weight, norm_bias, eps, normed)


@njit(**FAST)
def _epilogue_rows(y, first, stop, epilogue, bias, activation, scale, residual, norm_weight, norm_bias, eps, normed):
    if epilogue == _EPILOGUE_ACTIVATION:
        _bias_activation_rows(y, first, stop, bias, activation)
    elif epilogue >= _EPILOGUE_RESIDUAL:
        _residual_rows(y, first, stop, bias, scale, residual, epilogue == _EPILOGUE_RESIDUAL_NORM, norm_weight,
                       norm_bias, eps, normed)


# Below this many rows per thread the threads split the product's columns instead of its rows: each
# thread then packs only its share of the weights. With rows split every thread reads and packs all of
# them, which dominates when there are few rows: stage 4 at batch 1 (49 rows) ran 1.1-1.3x slower than
# NumPy's own products that way, 0.94-1.07x with columns split; at 196 and more rows either is as fast.
_MIN_ROWS_PER_THREAD = 128


@njit(parallel=True, **FAST)
def _linear(sgemm, parts, x, weight_t, y, epilogue, bias, activation, scale, residual, norm_weight, norm_bias, eps,
            normed):
    # One task per thread (``parts`` of them). Many rows: each task takes a band of rows, multiplies it
    # (unless ``sgemm`` is None: then NumPy has filled y already) and applies the epilogue to the rows
    # it has just written. Few rows: the tasks take bands of columns, then all rows get their epilogue.
    # Cutting bands into blocks of 32-256 rows, to apply the epilogue while still in L1/L2, was slower.
    rows, columns = y.shape
    if sgemm is not None and rows < _MIN_ROWS_PER_THREAD * parts:
        parts = min(parts, columns)
        for part in prange(parts):
            _product_block(sgemm, x, 0, weight_t, y, 0, rows, columns * part // parts, columns * (part + 1) // parts)
        if epilogue != _EPILOGUE_NONE:
            for part in prange(parts):
                _epilogue_rows(y, rows * part // parts, rows * (part + 1) // parts, epilogue, bias, activation, scale,
                               residual, norm_weight, norm_bias, eps, normed)
        return
    parts = min(parts, rows)
    for part in prange(parts):
        first = rows * part // parts
        stop = rows * (part + 1) // parts
        if sgemm is not None:
            _product_block(sgemm, x, first, weight_t, y, first, stop - first, 0, columns)
        _epilogue_rows(y, first, stop, epilogue, bias, activation, scale, residual, norm_weight, norm_bias, eps, normed)


_NO_BIAS = np.empty(0, np.float32)  # stand-ins for the operands an epilogue does not read
_NO_ROWS = np.empty((0, 0), np.float32)


def _run_linear(
    x: np.ndarray, weight_t: np.ndarray, epilogue: int, bias: np.ndarray = _NO_BIAS, activation: int = 0,
    scale: np.ndarray = _NO_BIAS, residual: np.ndarray = _NO_ROWS, norm_weight: np.ndarray = _NO_BIAS,
    norm_bias: np.ndarray = _NO_BIAS, eps: float = 0.0, normed: np.ndarray = _NO_ROWS,
) -> np.ndarray:
    """``x @ weight_t`` over the last axis of ``x`` as ``(rows, out)``, with ``epilogue`` applied in place."""
    # BLAS reads raw row-major memory: operands must be C-contiguous float32 (no copy when they are).
    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
    weight_t = np.ascontiguousarray(weight_t, dtype=np.float32)
    residual = np.ascontiguousarray(residual, dtype=np.float32)
    y = _empty((x.shape[0], weight_t.shape[1]))
    sgemm = _sgemm()
    if sgemm is None:
        np.matmul(x, weight_t, out=y)
        if epilogue == _EPILOGUE_NONE:
            return y
    with launching(), _products_launch():
        _linear(sgemm, numba.get_num_threads(), x, weight_t, y, epilogue, bias,
                activation, scale, residual, norm_weight, norm_bias, np.float32(eps), normed)
    return y


def linear(x: np.ndarray, linear: Linear, activation: str = "identity") -> np.ndarray:
    """``activation(x @ linear.weight + linear.bias)`` over the last axis of ``x``; bias and activation in one pass."""
    weight_t, bias = linear
    if bias is None and activation == "identity":
        y = _run_linear(x, weight_t, _EPILOGUE_NONE)
    else:
        if bias is None:
            bias = np.zeros(weight_t.shape[1], np.float32)
        y = _run_linear(x, weight_t, _EPILOGUE_ACTIVATION, bias, activation_code(activation))
    return y.reshape(x.shape[:-1] + (y.shape[1],))


def _norm_operands(norm: Norm | None, rows: np.ndarray) -> tuple[int, tuple]:
    """The epilogue that closes a residual branch, and its LayerNorm operands (stand-ins without ``norm``)."""
    if norm is None:
        return _EPILOGUE_RESIDUAL, (_NO_BIAS, _NO_BIAS, 0.0, _NO_ROWS)
    return _EPILOGUE_RESIDUAL_NORM, (norm.weight, norm.bias, norm.eps, _empty(rows.shape))


def linear_residual(
    x: np.ndarray, linear: Linear, scale: np.ndarray, residual: np.ndarray, norm: Norm | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``out = residual + scale * (x @ linear.weight + linear.bias)``, and ``layer_norm(out, norm)`` in the same
    pass over the rows when ``norm`` is given: ``(out, normed or None)``, shaped like ``residual``."""
    rows = residual.reshape(-1, residual.shape[-1])
    epilogue, (norm_weight, norm_bias, eps, normed) = _norm_operands(norm, rows)
    bias = np.zeros(linear.weight.shape[1], np.float32) if linear.bias is None else linear.bias
    y = _run_linear(x, linear.weight, epilogue, bias, 0, scale, rows, norm_weight, norm_bias, eps, normed)
    return y.reshape(residual.shape), None if norm is None else normed.reshape(residual.shape)


# A transformer MLP is two products around an activation on rows four times as wide as the stream: in
# stage 1 at batch 8 that hidden activation is 25 MB, written by fc1, re-read and rewritten by the
# activation, re-read by fc2. Here each thread takes blocks of this many rows through fc1, the activation
# and fc2 while the block's hidden rows are still in L2 (512 KiB in dinat-mini's stage 1, 2 MiB in its
# stage 3; the development VM's cores have 2 MiB each). dinat-mini at batch 8: 4-5% faster forwards;
# batch 1 unchanged; dinat-base's stage-1 MLP alone at batch 8 took 26% less time. Blocks of 128 or 256
# rows were slower overall (BLAS's per-call cost: the weights are packed again for every block), 1024 no
# faster.
_MLP_BLOCK_ROWS = 512


@njit(parallel=True, **FAST)
def _mlp(sgemm, parts, x, fc1_t, fc1_bias, activation, fc2_t, hidden, y, epilogue, bias, scale, residual,
         norm_weight, norm_bias, eps, normed):
    # ``hidden`` holds one block of rows per thread; each task is one thread's band of rows.
    rows = x.shape[0]
    block = hidden.shape[0] // parts
    normalise = epilogue == _EPILOGUE_RESIDUAL_NORM
    for part in prange(parts):
        own = part * block  # this thread's first row in ``hidden``
        for start in range(rows * part // parts, rows * (part + 1) // parts, block):
            count = min(block, rows * (part + 1) // parts - start)
            _product_block(sgemm, x, start, fc1_t, hidden, own, count, 0, hidden.shape[1])
            _bias_activation_rows(hidden, own, own + count, fc1_bias, activation)
            _product_block(sgemm, hidden, own, fc2_t, y, start, count, 0, y.shape[1])
            _residual_rows(y, start, start + count, bias, scale, residual, normalise, norm_weight, norm_bias, eps,
                           normed)


def _run_mlp(
    x: np.ndarray, fc1_t: np.ndarray, fc1_bias: np.ndarray, activation: str, fc2_t: np.ndarray, epilogue: int,
    bias: np.ndarray, scale: np.ndarray, residual: np.ndarray, norm_weight: np.ndarray = _NO_BIAS,
    norm_bias: np.ndarray = _NO_BIAS, eps: float = 0.0, normed: np.ndarray = _NO_ROWS,
) -> np.ndarray:
    """``activation(x @ fc1_t + fc1_bias) @ fc2_t`` as ``(rows, out)``, with ``epilogue`` applied in place."""
    code = activation_code(activation)
    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
    parts = numba.get_num_threads()
    sgemm = _sgemm()
    if sgemm is None or x.shape[0] < _MIN_ROWS_PER_THREAD * parts:  # few rows: the products split columns
        hidden = _run_linear(x, fc1_t, _EPILOGUE_ACTIVATION, fc1_bias, code)
        return _run_linear(hidden, fc2_t, epilogue, bias, 0, scale, residual, norm_weight, norm_bias, eps, normed)
    fc1_t = np.ascontiguousarray(fc1_t, dtype=np.float32)
    fc2_t = np.ascontiguousarray(fc2_t, dtype=np.float32)
    residual = np.ascontiguousarray(residual, dtype=np.float32)
    block = min(_MLP_BLOCK_ROWS, -(-x.shape[0] // parts))
    hidden = _empty((parts * block, fc1_t.shape[1]))
    y = _empty((x.shape[0], fc2_t.shape[1]))
    with launching(), _products_launch():
        _mlp(sgemm, parts, x, fc1_t, fc1_bias, code, fc2_t, hidden, y, epilogue, bias,
             scale, residual, norm_weight, norm_bias, np.float32(eps), normed)
    return y


def mlp_residual(
    x: np.ndarray, fc1: Linear, activation: str, fc2: Linear, scale: np.ndarray, residual: np.ndarray,
    norm: Norm | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``out = residual + scale * (activation(x @ fc1.weight + fc1.bias) @ fc2.weight + fc2.bias)``: a transformer
    MLP closing its residual branch, and ``layer_norm(out, norm)`` in the same pass when ``norm`` is given:
    ``(out, normed or None)``. Where the products run inside the kernels and there are enough rows, its
    hidden activation is never in memory whole (see ``_MLP_BLOCK_ROWS``)."""
    rows = residual.reshape(-1, residual.shape[-1])
    epilogue, (norm_weight, norm_bias, eps, normed) = _norm_operands(norm, rows)
    y = _run_mlp(x, fc1.weight, fc1.bias, activation, fc2.weight, epilogue, fc2.bias, scale, rows,
                 norm_weight, norm_bias, eps, normed)
    return y.reshape(residual.shape), None if norm is None else normed.reshape(residual.shape)


# ---------------------------------------------------------------------------------------------------
# 3x3 stride-2 convolution (tokenizer and downsamplers): im2col + products, or direct for few channels
# ---------------------------------------------------------------------------------------------------
@njit(**FAST)
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
                        # an unsigned index: no negative-index wrap-around, so the copy vectorises (3x faster)
                        cols[row, base + c] = x[np.uint64(at + c * channel_stride)]
                else:
                    for c in range(channels):
                        cols[row, base + c] = 0.0


@njit(parallel=True, **FAST)
def _im2col_3x3_s2(parts, x, shape, strides, cols):
    pixels = cols.shape[0]
    for part in prange(parts):
        first = pixels * part // parts
        _im2col_rows(x, shape, strides, first, pixels * (part + 1) // parts - first, cols, first)


# The patches of the tokenizer's second convolution are 29 MB at batch 8 (3136 x 288 floats per image),
# written once and read back once by the product. Here each thread takes its output pixels in blocks of
# this many, gathers a block's patches and multiplies them while they are still in L2, as _mlp does with
# its hidden rows. dinat-mini at batch 8: its five convolutions 0.5 ms per image faster in the model (the
# tokenizer's second 0.89 -> 0.58 ms), whole forwards 1-2.5% faster; batch 1 unchanged. Blocks of
# 256-2048 pixels were within noise of each other. The kernel adds ~2.5 s to a cold compile.
_CONV_BLOCK_ROWS = 512

# A convolution with few input channels (the first one's 3) runs directly instead. Its im2col product
# would have K = 9 x channels (27), far too short for BLAS's speed, and patches 2.25x the image's size.
# Here four output pixels of a row share each weight row, held in two vectors of output channels. Both
# ways read the input in place through its strides, so the model's channels-first pixel values need no
# layout pass. dinat-mini's first convolution, layout pass included, at batch 8: 0.50 -> 0.13 ms per
# image (0.62 -> 0.23 at batch 1); with 16 input channels still 0.25 -> 0.18 (in alternation). Both ways
# share one parallel kernel (a kernel of its own cost ~0.6 s more of cold compile); the direct way adds
# ~1.5 s to it.
_DIRECT_MAX_CHANNELS = 16


@njit(**FAST)
def _direct_conv_rows(x, shape, strides, weight_cols, bias, y, first_row, stop_row):
    # output rows first_row..stop_row - 1 (flat over images and rows); x read as in _im2col_rows
    _, height, width, channels = shape
    batch_stride, row_stride, column_stride, channel_stride = strides
    out_height = (height + 1) // 2
    out_width = (width + 1) // 2
    out_channels = y.shape[1]
    weights = weight_cols.reshape(-1)
    out = y.reshape(-1)
    for row in range(first_row, stop_row):
        b, oi = row // out_height, row % out_height
        for oj in range(0, out_width, 4):
            for co in range(0, out_channels, 2 * LANES):
                count = out_channels - co  # lanes of the two vectors: min(16, count) and count - 16
                low0 = low1 = low2 = low3 = load(bias, co, count)
                high0 = high1 = high2 = high3 = load(bias, co + LANES, count - LANES)
                for di in range(3):
                    i = 2 * oi + di - 1
                    if i < 0 or i >= height:
                        continue
                    for dj in range(3):
                        # the first pixel's input column, the next ones' 2 apart; zero outside the image
                        # (the padding). Written out: an inlined helper for this test ran 6x slower.
                        j = 2 * oj + dj - 1
                        for c in range(channels):
                            w_at = ((di * 3 + dj) * channels + c) * out_channels + co
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
def _conv3x3_s2(sgemm, parts, x, shape, strides, weight_cols, bias, cols, y):
    # One task per thread. Without ``cols`` (few input channels) a band of output rows computed directly;
    # otherwise a band of output pixels, in blocks whose patches are gathered into this thread's block of
    # ``cols`` and multiplied by BLAS (``sgemm`` None: the direct way only, for want of BLAS).
    pixels, out_channels = y.shape
    rows = shape[0] * ((shape[1] + 1) // 2)
    block = cols.shape[0] // parts
    for part in prange(parts):
        if block == 0:
            _direct_conv_rows(x, shape, strides, weight_cols, bias, y, rows * part // parts,
                              rows * (part + 1) // parts)
        elif sgemm is not None:
            own = part * block  # this thread's first row in ``cols``
            stop = pixels * (part + 1) // parts
            for start in range(pixels * part // parts, stop, block):
                count = min(block, stop - start)
                _im2col_rows(x, shape, strides, start, count, cols, own)
                _product_block(sgemm, cols, own, weight_cols, y, start, count, 0, out_channels)
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
    parts = numba.get_num_threads()
    elements, strides = _elements_and_strides(x)
    weight_cols = np.ascontiguousarray(weight_cols, dtype=np.float32)
    if channels <= _DIRECT_MAX_CHANNELS:
        bias = np.zeros(out_channels, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        y = _empty((pixels, out_channels))
        with launching():
            _conv3x3_s2(_sgemm(), min(parts, batch * out_height), elements, x.shape,
                        strides, weight_cols, bias, _NO_ROWS, y)
        return y.reshape(batch, out_height, out_width, out_channels)
    few = pixels < _MIN_ROWS_PER_THREAD * parts
    if _sgemm() is None or few:  # no blocks: the patches whole, then the product (few pixels: it splits columns)
        cols = _empty((pixels, 9 * channels))
        if few:  # at most a few hundred patches, 10-30 us on this thread: not worth a parallel kernel to compile
            _im2col_rows(elements, x.shape, strides, 0, pixels, cols, 0)
        else:
            with launching():
                _im2col_3x3_s2(parts, elements, x.shape, strides, cols)
        return linear(cols, Linear(weight_cols, bias)).reshape(batch, out_height, out_width, -1)
    bias = _NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    block = min(_CONV_BLOCK_ROWS, -(-pixels // parts))
    cols = _empty((parts * block, 9 * channels))
    y = _empty((pixels, out_channels))
    with launching(), _products_launch():
        _conv3x3_s2(_sgemm(), parts, elements, x.shape, strides, weight_cols, bias, cols, y)
    return y.reshape(batch, out_height, out_width, -1)


_process_set_up = False


def set_up_process() -> None:
    """The CPU backend's process-wide set-up, done once: glibc's malloc thresholds raised, so that large
    activations are reused from the heap instead of faulted in again (see cpu_malloc)."""
    global _process_set_up
    if not _process_set_up:
        raise_thresholds()
        _process_set_up = True


def set_num_threads(threads: int) -> None:
    """Number of threads the parallel kernels use."""
    numba.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Data movement: on the CPU the "device" arrays are NumPy arrays
# ---------------------------------------------------------------------------------------------------
def upload(array: np.ndarray) -> np.ndarray:
    """A float32 copy the kernels can read; a copy, so that the model holds no view of a mapped file."""
    return np.array(array, dtype=np.float32)


def download(array: np.ndarray) -> np.ndarray:
    """The host NumPy array of a backend array."""
    return array


def linear_weight(weight: np.ndarray) -> np.ndarray:
    """``(out, in)`` PyTorch weight -> contiguous ``(in, out)``, copied once at load (the products run slower
    on the transposed view)."""
    return linear_weight_layout(weight)


def conv_weight(weight: np.ndarray) -> np.ndarray:
    """``(out, in, 3, 3)`` PyTorch weight -> ``(9 * in, out)`` rows in im2col (row, column, channel) order."""
    return conv_weight_layout(weight)


def pad_bottom_right(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pad ``(batch, h, w, channels)`` at the bottom and right to ``height x width``."""
    padded = np.zeros((x.shape[0], height, width, x.shape[3]), np.float32)
    padded[:, : x.shape[1], : x.shape[2]] = x
    return padded


def crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The top-left ``height x width`` of ``(batch, h, w, channels)``, contiguous."""
    return np.ascontiguousarray(x[:, :height, :width])


def mean_pool(x: np.ndarray) -> np.ndarray:
    """Average of ``(batch, height, width, channels)`` over the spatial axes."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1, dtype=np.float32)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """Pixel values ``(batch, channels, height, width)`` -> channels-last float32: a view of them when they
    are contiguous float32 (the first convolution reads it in place; see ``_DIRECT_MAX_CHANNELS``)."""
    return np.asarray(x, dtype=np.float32).transpose(0, 2, 3, 1)
