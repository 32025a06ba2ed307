"""Matrix products of the CUDA backend with their epilogues fused in: ``linear``, ``linear_residual``,
``mlp_residual``.

A tiled shared-memory product (a square output tile per block, 4x4 outputs per thread, 16-deep k-steps)
applies bias + activation, or ``residual + layer_scale * (y + bias)``, as it stores. cuBLAS (through
CuPy) replaces the product when CuPy is importable; the epilogue then runs as its own kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda, float32

from ..common import Epilogue, Linear, Norm, activation_code
from .device import CUPY, LOCK, ONE, THREADS, ZERO, empty, grid_blocks, placeholder, reshaped
from .norm import layer_norm_rows

# float32 constants (see device.ZERO)
_HALF = np.float32(0.5)
_SQRT_HALF = np.float32(0.7071067811865476)
_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_CUBIC = np.float32(0.044715)
_SELU_ALPHA = np.float32(1.6732632423543772)
_SELU_SCALE = np.float32(1.0507009873554805)


# ---------------------------------------------------------------------------------------------------
# Activations and epilogues
# ---------------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _activate(x, activation):
    if activation == 1:
        return _HALF * x * (ONE + math.erf(x * _SQRT_HALF))
    if activation == 2:
        return _HALF * x * (ONE + math.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)))
    if activation == 3:
        return max(x, ZERO)
    if activation == 4:
        return _SELU_SCALE * (x if x > ZERO else _SELU_ALPHA * (math.exp(x) - ONE))
    return x


_EPILOGUE_ACTIVATION = int(Epilogue.ACTIVATION)  # out = activation(acc + bias)
_EPILOGUE_RESIDUAL = int(Epilogue.RESIDUAL)  # out = residual + scale * (acc + bias)


@cuda.jit(device=True)
def _epilogue(value, row, col, bias, has_bias, mode, activation, scale, residual):
    if has_bias:
        value += bias[col]
    if mode == _EPILOGUE_RESIDUAL:
        return residual[row, col] + scale[col] * value
    return _activate(value, activation)


@cuda.jit
def _epilogue_kernel(y, bias, has_bias, mode, activation, scale, residual):
    rows, columns = y.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, rows * columns, stride):
        row = index // columns
        col = index % columns
        y[row, col] = _epilogue(y[row, col], row, col, bias, has_bias, mode, activation, scale, residual)


# ---------------------------------------------------------------------------------------------------
# Matrix product: a square output tile per block, 4x4 outputs per thread, 16-deep k-steps
# ---------------------------------------------------------------------------------------------------
_TILE_K = 16
_MICRO = 4  # each thread owns a 4x4 block of outputs, spread tile/4 apart so that stores coalesce
_GEMM_TILES = (64, 32)  # 256 or 64 threads per block
# Below this many 64x64 tiles the GPU would sit mostly idle (late stages at batch 1): use 32x32 tiles.
_SMALL_GRID = 128

_gemm_kernels: dict[int, Any] = {}


def _gemm_kernel(tile: int) -> Any:
    """The tiled product ``out = epilogue(a @ b)`` for one output tile size (shared sizes are constants)."""
    compiled = _gemm_kernels.get(tile)
    if compiled is not None:
        return compiled
    spread = tile // _MICRO
    threads = spread * spread
    a_loads = tile * _TILE_K // threads
    b_loads = _TILE_K * tile // threads
    a_columns = tile + 1  # shared array shapes must be compile-time constants, not expressions

    @cuda.jit
    def kernel(a, b, out, bias, has_bias, mode, activation, scale, residual):
        # a is staged k-major with one pad column, so the transposing store hits distinct banks.
        a_tile = cuda.shared.array((_TILE_K, a_columns), dtype=float32)
        b_tile = cuda.shared.array((_TILE_K, tile), dtype=float32)
        accumulator = cuda.local.array((_MICRO, _MICRO), dtype=float32)
        a_values = cuda.local.array(_MICRO, dtype=float32)
        b_values = cuda.local.array(_MICRO, dtype=float32)

        rows, depth = a.shape
        columns = b.shape[1]
        thread = cuda.threadIdx.x
        tx = thread % spread
        ty = thread // spread
        row0 = cuda.blockIdx.x * tile  # rows on x: grid x allows 2**31 - 1 blocks, y only 65535
        col0 = cuda.blockIdx.y * tile
        for r in range(_MICRO):
            for c in range(_MICRO):
                accumulator[r, c] = ZERO

        for k0 in range(0, depth, _TILE_K):
            for step in range(a_loads):
                element = thread + step * threads
                m = element // _TILE_K
                k = element % _TILE_K
                row = row0 + m
                kk = k0 + k
                a_tile[k, m] = a[row, kk] if row < rows and kk < depth else ZERO
            for step in range(b_loads):
                element = thread + step * threads
                k = element // tile
                n = element % tile
                kk = k0 + k
                col = col0 + n
                b_tile[k, n] = b[kk, col] if kk < depth and col < columns else ZERO
            cuda.syncthreads()
            for k in range(_TILE_K):
                for r in range(_MICRO):
                    a_values[r] = a_tile[k, ty + r * spread]
                for c in range(_MICRO):
                    b_values[c] = b_tile[k, tx + c * spread]
                for r in range(_MICRO):
                    for c in range(_MICRO):
                        accumulator[r, c] += a_values[r] * b_values[c]
            cuda.syncthreads()

        for r in range(_MICRO):
            row = row0 + ty + r * spread
            if row < rows:
                for c in range(_MICRO):
                    col = col0 + tx + c * spread
                    if col < columns:
                        out[row, col] = _epilogue(
                            accumulator[r, c], row, col, bias, has_bias, mode, activation, scale, residual
                        )

    _gemm_kernels[tile] = kernel
    return kernel


def _cupy_gemm() -> Callable[[Any, Any, Any], None] | None:
    """cuBLAS through CuPy when CuPy is in use (``device.CUPY``)."""
    if CUPY is None:
        return None

    def gemm(a: Any, b: Any, out: Any) -> None:
        # Zero-copy views through __cuda_array_interface__; CuPy and numba both launch on the legacy
        # default stream, so the product is ordered between the numba kernels around it.
        CUPY.matmul(CUPY.asarray(a), CUPY.asarray(b), out=CUPY.asarray(out))

    return gemm


# ``(a, b, out) -> None`` writing ``a @ b`` into ``out``, or None for the built-in tiled kernel.
_external_gemm: Callable[[Any, Any, Any], None] | None = _cupy_gemm()


def _product(x2d: Any, weight_t: Any, bias: Any, mode: int, activation: int, scale: Any, residual: Any) -> Any:
    rows, depth = x2d.shape
    if weight_t.shape[0] != depth:
        raise ValueError(f"matrix product of {tuple(x2d.shape)} and {tuple(weight_t.shape)}: inner sizes differ")
    columns = weight_t.shape[1]
    out = empty((rows, columns))
    has_bias = bias is not None
    bias = bias if has_bias else placeholder(1)
    scale = scale if scale is not None else placeholder(1)
    residual = residual if residual is not None else placeholder(2)
    if _external_gemm is not None:
        _external_gemm(x2d, weight_t, out)
        if has_bias or mode != _EPILOGUE_ACTIVATION or activation != 0:
            _epilogue_kernel[grid_blocks(rows * columns), THREADS](
                out, bias, has_bias, mode, activation, scale, residual
            )
        return out
    tile = _GEMM_TILES[0]
    if ((columns + tile - 1) // tile) * ((rows + tile - 1) // tile) < _SMALL_GRID:
        tile = _GEMM_TILES[1]
    grid = ((rows + tile - 1) // tile, (columns + tile - 1) // tile)
    _gemm_kernel(tile)[grid, (tile // _MICRO) ** 2](
        x2d, weight_t, out, bias, has_bias, mode, activation, scale, residual
    )
    return out


def linear(x: Any, linear: Linear, activation: str = "identity") -> Any:
    """``activation(x @ linear.weight + linear.bias)`` over the last axis of ``x``; bias and activation fused in."""
    code = activation_code(activation)
    with LOCK:
        shape = tuple(x.shape)
        y = _product(reshaped(x, (-1, shape[-1])), linear.weight, linear.bias, _EPILOGUE_ACTIVATION, code, None, None)
        return reshaped(y, shape[:-1] + (y.shape[1],))


def _residual_product(x: Any, linear: Linear, scale: Any, residual: Any) -> Any:
    """``residual + scale * linear(x)`` as ``(rows, out)``; the caller holds ``LOCK``."""
    x2d = reshaped(x, (-1, tuple(x.shape)[-1]))
    rows = reshaped(residual, (x2d.shape[0], linear.weight.shape[1]))
    return _product(x2d, linear.weight, linear.bias, _EPILOGUE_RESIDUAL, 0, scale, rows)


def _closing(y: Any, shape: tuple[int, ...], norm: Norm | None) -> tuple[Any, Any]:
    """``(y, layer_norm(y) or None)``, both shaped ``shape``: here the LayerNorm is a kernel of its own."""
    normed = None if norm is None else reshaped(layer_norm_rows(y, norm.weight, norm.bias, norm.eps), shape)
    return reshaped(y, shape), normed


def linear_residual(
    x: Any, linear: Linear, scale: Any, residual: Any, norm: Norm | None = None
) -> tuple[Any, Any]:
    """``out = residual + scale * linear(x)`` and ``layer_norm(out, norm)`` when given: ``(out, normed or None)``."""
    with LOCK:
        return _closing(_residual_product(x, linear, scale, residual), tuple(residual.shape), norm)


def mlp_residual(
    x: Any, fc1: Linear, activation: str, fc2: Linear, scale: Any, residual: Any, norm: Norm | None = None
) -> tuple[Any, Any]:
    """``out = residual + scale * fc2(activation(fc1(x)))`` and ``layer_norm(out, norm)`` when given: the two
    products one after the other, each with its epilogue fused in."""
    with LOCK:
        hidden = _product(reshaped(x, (-1, tuple(x.shape)[-1])), fc1.weight, fc1.bias, _EPILOGUE_ACTIVATION,
                          activation_code(activation), None, None)
        return _closing(_residual_product(hidden, fc2, scale, residual), tuple(residual.shape), norm)
