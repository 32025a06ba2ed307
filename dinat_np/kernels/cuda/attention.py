"""Dilated neighborhood attention on the CUDA backend, fused (the q/k/v product's bias, QK + rpb, softmax,
AV) and unfused (``na_qk``, ``na_av``); ViT-rpb's global attention, which is the fused kernel with a window
as large as the map.

The fused kernel runs one warp per query, its lanes across the channels, with the query's logits in
shared memory, so the attention matrix reaches global memory only when it is asked for. The window
geometry comes from ``common.window_starts`` (run on the host, cached on the device per
``(length, kernel_size, dilation)``), so both backends follow one copy of NATTEN's border rule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda, float32

from ..common import check_global_grid, check_qkv_bias, check_window, window_starts
from .device import LOCK, ONE, THREADS, ZERO, empty, grid_blocks, placeholder, reshaped, unravel_nhwc

_NEG_INF = np.float32(-np.inf)  # float32 (see device.ZERO)

_WARP = 32
_PADDED_WARP = 33  # a row of lane partials plus one: rows start in different banks
_WARPS_PER_BLOCK = 4  # queries per block

_window_cache: dict[tuple[int, int, int], tuple[Any, Any]] = {}


def _window_tables(length: int, kernel_size: int, dilation: int) -> tuple[Any, Any]:
    """Device copies of ``common.window_starts`` (NATTEN's border rule), cached per geometry."""
    key = (length, kernel_size, dilation)
    tables = _window_cache.get(key)
    if tables is None:
        start, bias = window_starts(length, kernel_size, dilation)
        tables = _window_cache[key] = (
            cuda.to_device(start.astype(np.int32)), cuda.to_device(bias.astype(np.int32))
        )
    return tables


_SHARED_BUDGET = 48 * 1024  # static shared memory per block that every CUDA GPU grants
_MAX_KERNEL_SIZE = math.isqrt(_SHARED_BUDGET // 4 // _WARPS_PER_BLOCK - _WARP * _PADDED_WARP)  # 44
_na_kernels: dict[int, Any] = {}


def _na_kernel(kernel_size: int) -> Any:
    """The fused kernel for one kernel_size (its shared array of probabilities needs a constant size)."""
    compiled = _na_kernels.get(kernel_size)
    if compiled is not None:
        return compiled
    K = kernel_size
    window = K * K

    @cuda.jit
    def kernel(qkv, qkv_bias, has_bias, rpb, row_start, row_bias, col_start, col_bias, dilation, scale, out, attn,
               store_attn):
        # One warp per query (b, i, j, h), its lanes across the channels: every key and value row is read
        # as whole 128-byte lines, and the neighbouring warps (the other heads, the next pixel) hit the
        # same lines in cache. The lanes' partial dot products of up to 32 neighbours go to shared memory
        # (rows padded to 33: no bank conflicts) and each lane then sums one neighbour's row; shuffles
        # would do this too, but numba's simulator, which runs these kernels in CI, has none.
        # qkv (batch, height, width, 3, heads, head_dim) is indexed whole: slicing it into q/k/v views on
        # the host made numba-cuda check their extents in a Python loop over every (pixel, head).
        partials = cuda.shared.array((_WARPS_PER_BLOCK, _WARP, _PADDED_WARP), dtype=float32)
        probabilities = cuda.shared.array((_WARPS_PER_BLOCK, window), dtype=float32)
        batch, height, width, _, heads, head_dim = qkv.shape
        lane = cuda.threadIdx.x % _WARP
        slot = cuda.threadIdx.x // _WARP
        index = cuda.blockIdx.x * _WARPS_PER_BLOCK + slot
        valid = index < batch * height * width * heads  # no early return: every thread meets the barriers
        b, i, j, h = unravel_nhwc(index if valid else 0, height, width, heads)
        key_row0 = row_start[i]
        key_col0 = col_start[j]

        for n0 in range(0, window, _WARP):
            if valid:
                for n in range(n0, min(n0 + _WARP, window)):
                    r = key_row0 + (n // K) * dilation
                    c = key_col0 + (n % K) * dilation
                    partial = ZERO
                    for t in range(lane, head_dim, _WARP):
                        q = qkv[b, i, j, 0, h, t]
                        # b_q here; b_k shifts all of a query's logits alike, which softmax cancels, so it is
                        # dropped; b_v is added once at the end
                        if has_bias:
                            q += qkv_bias[h * head_dim + t]
                        partial += q * qkv[b, r, c, 1, h, t]
                    partials[slot, n - n0, lane] = partial
            cuda.syncthreads()
            n = n0 + lane
            if valid and n < window:
                dot = ZERO
                for other in range(_WARP):
                    dot += partials[slot, lane, other]
                probabilities[slot, n] = dot * scale + rpb[h, row_bias[i] + n // K, col_bias[j] + n % K]
            cuda.syncthreads()

        best = _NEG_INF
        if valid:
            for n in range(window):
                best = max(best, probabilities[slot, n])
        cuda.syncthreads()
        if valid:
            for n in range(lane, window, _WARP):
                probabilities[slot, n] = math.exp(probabilities[slot, n] - best)
        cuda.syncthreads()
        if not valid:
            return  # no barrier below
        total = ZERO
        for n in range(window):
            total += probabilities[slot, n]
        inverse = ONE / total
        if store_attn:
            for n in range(lane, window, _WARP):
                attn[b, h, i, j, n] = probabilities[slot, n] * inverse

        for t in range(lane, head_dim, _WARP):
            accumulator = ZERO
            for n in range(window):
                accumulator += probabilities[slot, n] * qkv[
                    b, key_row0 + (n // K) * dilation, key_col0 + (n % K) * dilation, 2, h, t
                ]
            accumulator *= inverse  # the probabilities sum to one, so b_v is added once
            if has_bias:
                accumulator += qkv_bias[(2 * heads + h) * head_dim + t]
            out[b, i, j, h, t] = accumulator

    _na_kernels[kernel_size] = kernel
    return kernel


def neighborhood_attention(
    qkv: Any,
    rpb: Any,
    kernel_size: int,
    dilation: int,
    scale: float,
    return_attention: bool = False,
    qkv_bias: Any = None,
) -> tuple[Any, Any]:
    """Fused ``softmax(scale * q.k + rpb) @ v`` over each query's dilated window.

    ``qkv`` is ``(batch, height, width, 3, heads, head_dim)`` (queries, keys, values side by side);
    ``qkv_bias`` (``(3 * heads * head_dim,)``, the biases of that product side by side, or None) is
    folded into the kernel: the result is that of ``qkv + qkv_bias``. Returns
    the context ``(batch, height, width, heads, head_dim)`` and, when asked, the attention probabilities
    ``(batch, heads, height, width, kernel_size**2)`` (HF's layout).
    """
    kernel_size, dilation = int(kernel_size), int(dilation)
    check_window(qkv.shape[1], qkv.shape[2], kernel_size, dilation)
    if kernel_size > _MAX_KERNEL_SIZE:
        raise ValueError(
            f"kernel_size {kernel_size} is too large for the CUDA neighborhood attention kernel (at most "
            f"{_MAX_KERNEL_SIZE}: a block's probabilities must fit in 48 KiB of shared memory); use device='cpu'"
        )
    return _attention(qkv, rpb, kernel_size, dilation, scale, return_attention, qkv_bias)


def global_attention(
    qkv: Any, rpb: Any, scale: float, return_attention: bool = False, qkv_bias: Any = None
) -> tuple[Any, Any]:
    """Self-attention over every position of a square ``L x L`` map with ViT-rpb's relative position bias
    ``rpb`` ``(heads, 2L-1, 2L-1)``, read at the key-minus-query offset; ``qkv`` and ``qkv_bias`` as for
    :func:`neighborhood_attention`. Returns the context and, when asked, the probabilities ``(batch, heads,
    L * L, L * L)``.

    It is the fused neighborhood kernel with kernel size ``L`` (even or odd): every window is the whole
    map, and NATTEN's bias index is key minus query.
    """
    batch, height, width, _, heads, _ = qkv.shape
    length = check_global_grid(height, width, tuple(rpb.shape))
    if length > _MAX_KERNEL_SIZE:
        raise ValueError(
            f"a {length}x{length} map is too large for the CUDA global attention kernel (at most "
            f"{_MAX_KERNEL_SIZE}x{_MAX_KERNEL_SIZE}: a block's probabilities must fit in 48 KiB of shared "
            "memory); use device='cpu'"
        )
    context, attention = _attention(qkv, rpb, length, 1, scale, return_attention, qkv_bias)
    if attention is not None:
        attention = reshaped(attention, (batch, heads, length * length, length * length))
    return context, attention


def _attention(
    qkv: Any, rpb: Any, kernel_size: int, dilation: int, scale: float, return_attention: bool, qkv_bias: Any
) -> tuple[Any, Any]:
    # the two ops above, once their window is checked
    batch, height, width, _, heads, head_dim = qkv.shape
    has_bias = qkv_bias is not None
    if has_bias:
        check_qkv_bias(qkv_bias.shape, heads, head_dim)
    with LOCK:
        qkv_bias = qkv_bias if has_bias else placeholder(1)
        row_start, row_bias = _window_tables(height, kernel_size, dilation)
        col_start, col_bias = _window_tables(width, kernel_size, dilation)
        out = empty((batch, height, width, heads, head_dim))
        attn = empty((batch, heads, height, width, kernel_size**2)) if return_attention else placeholder(5)
        queries = batch * height * width * heads
        blocks = (queries + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK
        _na_kernel(kernel_size)[blocks, _WARPS_PER_BLOCK * _WARP](
            qkv, qkv_bias, has_bias, rpb, row_start, row_bias, col_start, col_bias, dilation, np.float32(scale), out,
            attn, bool(return_attention),
        )
        return out, (attn if return_attention else None)


@cuda.jit
def _na_qk_kernel(query, key, rpb, row_start, row_bias, col_start, col_bias, kernel_size, dilation, logits):
    batch, heads, height, width, window = logits.shape
    head_dim = query.shape[4]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * heads * height * width * window, stride):
        n = index % window
        rest = index // window
        j = rest % width
        rest //= width
        i = rest % height
        rest //= height
        h = rest % heads
        b = rest // heads
        ki = n // kernel_size
        kj = n % kernel_size
        r = row_start[i] + ki * dilation
        c = col_start[j] + kj * dilation
        dot = ZERO
        for t in range(head_dim):
            dot += query[b, i, j, h, t] * key[b, r, c, h, t]
        logits[b, h, i, j, n] = dot + rpb[h, row_bias[i] + ki, col_bias[j] + kj]


@cuda.jit
def _na_av_kernel(attn, value, row_start, col_start, kernel_size, dilation, out):
    batch, height, width, heads, head_dim = value.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * height * width * heads * head_dim, stride):
        t = index % head_dim
        rest = index // head_dim
        h = rest % heads
        rest //= heads
        j = rest % width
        rest //= width
        i = rest % height
        b = rest // height
        accumulator = ZERO
        for ki in range(kernel_size):
            r = row_start[i] + ki * dilation
            for kj in range(kernel_size):
                accumulator += attn[b, h, i, j, ki * kernel_size + kj] * value[b, r, col_start[j] + kj * dilation, h, t]
        out[b, i, j, h, t] = accumulator


def na_qk(query: Any, key: Any, rpb: Any, kernel_size: int, dilation: int) -> Any:
    """Unfused ``q.k + rpb``: ``(batch, heads, height, width, kernel_size**2)`` from channels-last q and k."""
    kernel_size, dilation = int(kernel_size), int(dilation)
    check_window(query.shape[1], query.shape[2], kernel_size, dilation)
    with LOCK:
        batch, height, width, heads, _ = query.shape
        row_start, row_bias = _window_tables(height, kernel_size, dilation)
        col_start, col_bias = _window_tables(width, kernel_size, dilation)
        logits = empty((batch, heads, height, width, kernel_size * kernel_size))
        _na_qk_kernel[grid_blocks(logits.size), THREADS](
            query, key, rpb, row_start, row_bias, col_start, col_bias, kernel_size, dilation, logits
        )
        return logits


def na_av(attn: Any, value: Any, kernel_size: int, dilation: int) -> Any:
    """Unfused ``attn @ v`` with ``attn`` in HF layout and ``value`` channels-last; result channels-last."""
    kernel_size, dilation = int(kernel_size), int(dilation)
    check_window(value.shape[1], value.shape[2], kernel_size, dilation)
    with LOCK:
        height, width = value.shape[1], value.shape[2]
        row_start, _ = _window_tables(height, kernel_size, dilation)
        col_start, _ = _window_tables(width, kernel_size, dilation)
        out = empty(value.shape)
        _na_av_kernel[grid_blocks(out.size), THREADS](attn, value, row_start, col_start, kernel_size, dilation, out)
        return out
