"""Matrix products with their epilogues on the CPU: ``linear``, ``linear_residual`` and ``mlp_residual``.

A product is computed inside the kernels by an ``sgemm``, the own (``gemm``) or NumPy's OpenBLAS (see
``blas`` for why it is called from there), so that a thread applies the epilogue (bias and activation,
or a closed residual branch and its LayerNorm) to rows it has just written; else NumPy's matmul runs
first and a kernel applies the epilogue. Which of the three: ``gemm.PRODUCTS``.

A weight is an ``(in, out)`` matrix, or that matrix packed for the own product (``gemm.PackedWeight``, as
the backend's ``linear_weight`` and ``conv_weight`` make them where the own product runs): either is
taken on every path, converted where it does not suit it. The kernels read a weight as a 2-D array of
panels, each ``in`` rows deep and ``weight.shape[1]`` columns wide, one after the other: the packed
panels, or the plain matrix as one panel as wide as itself.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..common import GELU, GELU_TANH, RELU, SELU, Epilogue, Linear, Norm, activation_code
from . import gemm
from .band import FLOAT, INT, band, floats
from .blas import NO_TRANS, NUMPY_OPENBLAS, ROW_MAJOR
from .layout import aligned_empty
from .norm import normalise_row
from .simd import FAST
from .threads import launching, thread_count

_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


# ---------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------
# Abramowitz & Stegun 7.1.28: erf(s) = 1 - (1 + a1 s + ... + a6 s^6)^-16 for s >= 0, |error| <= 3e-7.
# Unlike libm's erf it is plain float32 arithmetic, so the exact-GELU epilogue vectorises.
_ERF_A = tuple(np.float32(a) for a in (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672,
                                      0.0000430638))


@njit(inline="always", **FAST)
def _erf_nonnegative(s):
    a1, a2, a3, a4, a5, a6 = _ERF_A
    p = np.float32(1.0) + s * (a1 + s * (a2 + s * (a3 + s * (a4 + s * (a5 + s * a6)))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return np.float32(1.0) - np.float32(1.0) / p


@njit(inline="always", **FAST)
def _activate(x, activation):
    # activation: a code of common.ACTIVATIONS
    if activation == GELU:
        # x (1 + erf(x / sqrt 2)) / 2 = (x + |x| erf(|x| / sqrt 2)) / 2: no sign to restore after the erf
        # (a copysign per element made the epilogue ~25% slower)
        magnitude = abs(x)
        return np.float32(0.5) * (x + magnitude * _erf_nonnegative(magnitude * np.float32(_SQRT_HALF)))
    if activation == GELU_TANH:
        return 0.5 * x * (1.0 + math.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    if activation == RELU:
        return max(x, 0.0)
    if activation == SELU:
        return _SELU_SCALE * (x if x > 0.0 else _SELU_ALPHA * (math.exp(x) - 1.0))
    return x


# ---------------------------------------------------------------------------------------------------
# Products and epilogues
# ---------------------------------------------------------------------------------------------------
_BLAS = NUMPY_OPENBLAS
_PRODUCTS = gemm.PRODUCTS  # "own", "openblas" or "numpy" (the tests switch it)


def kernel_sgemm():
    """The kernels' ``sgemm`` argument: gemm's own, OpenBLAS's, or None (NumPy multiplies first)."""
    return gemm.sgemm() if _PRODUCTS == "own" else _BLAS.sgemm if _PRODUCTS == "openblas" else None


def weight_operand(weight: np.ndarray | gemm.PackedWeight) -> np.ndarray:
    """What the kernels read for ``weight`` on this path: the own product's packed panels, else the plain
    float32 matrix (converted when it came in the other form, e.g. a direct caller's matrix)."""
    if _PRODUCTS == "own":
        return (weight if isinstance(weight, gemm.PackedWeight) else gemm.pack(np.asarray(weight))).panels
    return _floats(weight.matrix() if isinstance(weight, gemm.PackedWeight) else weight)


def column_unit() -> int:
    """The columns the threads split a few-row product's weight by: the own product's whole panels."""
    return gemm.TILE_COLUMNS if _PRODUCTS == "own" else 1


def products_blas():
    """``launching``'s argument for a kernel that multiplies: OpenBLAS, kept single-threaded while it runs, where
    the kernels call it."""
    return _BLAS if _PRODUCTS == "openblas" else None


_EPILOGUE_NONE, _EPILOGUE_ACTIVATION = int(Epilogue.NONE), int(Epilogue.ACTIVATION)
_EPILOGUE_RESIDUAL, _EPILOGUE_RESIDUAL_NORM = int(Epilogue.RESIDUAL), int(Epilogue.RESIDUAL_NORM)


@njit(inline="always", **FAST)
def panel_offset(weight, depth, column):
    # where column ``column`` of ``weight`` (panels ``depth`` rows deep, see the module docstring) starts, in
    # floats: its panel's first row, and the column within that row
    panel_width = weight.shape[1]
    return column // panel_width * depth * panel_width + column % panel_width


@njit(inline="always", **FAST)
def product_block(sgemm, x, x_row, weight, y, y_row, rows, first_col, stop_col):
    # y[y_row : y_row + rows, cols] = x[x_row : x_row + rows] @ (the weight's columns cols) by one sgemm call
    # on this thread (OpenBLAS is kept single-threaded meanwhile); ``weight``: panels (see the module
    # docstring), first_col at the start of one where there are several. Pointers are computed, not sliced:
    # a view would be counted and freed.
    in_features = x.shape[1]
    out_features = y.shape[1]
    sgemm(
        ROW_MAJOR, NO_TRANS, NO_TRANS, rows, stop_col - first_col, in_features, np.float32(1.0),
        x.ctypes.data + x_row * in_features * 4, in_features,
        weight.ctypes.data + panel_offset(weight, in_features, first_col) * 4, weight.shape[1],
        np.float32(0.0), y.ctypes.data + (y_row * out_features + first_col) * 4, out_features,
    )


@njit(inline="always", **FAST)
def _bias_activation_rows(y, first, stop, bias, activation):
    for row in range(first, stop):
        for c in range(y.shape[1]):
            y[row, c] = _activate(y[row, c] + bias[c], activation)


@njit(inline="always", **FAST)
def _residual_rows(y, first, stop, bias, scale, residual, normalise, norm_weight, norm_bias, eps, normed):
    for row in range(first, stop):
        for c in range(y.shape[1]):
            y[row, c] = residual[row, c] + scale[c] * (y[row, c] + bias[c])
        if normalise:
            normalise_row(y, row, norm_weight, norm_bias, eps, normed)


@band(floats(2), INT, INT, INT, floats(1, True), INT, floats(1, True), floats(2, True), floats(1, True),
      floats(1, True), FLOAT, floats(2))
def _epilogue_rows(y, first, stop, epilogue, bias, activation, scale, residual, norm_weight, norm_bias, eps, normed):
    if epilogue == _EPILOGUE_ACTIVATION:
        _bias_activation_rows(y, first, stop, bias, activation)
    elif epilogue >= _EPILOGUE_RESIDUAL:
        _residual_rows(y, first, stop, bias, scale, residual, epilogue == _EPILOGUE_RESIDUAL_NORM, norm_weight,
                       norm_bias, eps, normed)


# Below this many rows per thread the threads split the product's columns instead of its rows: each
# thread then packs only its share of the weights. With rows split every thread reads and packs all of
# them, which dominates when there are few rows (stage 4 at batch 1: 49).
MIN_ROWS_PER_THREAD = 128


@njit(parallel=True, **FAST)
def _linear(epilogue_rows, sgemm, parts, column_unit, x, weight, y, epilogue, bias, activation, scale, residual,
            norm_weight, norm_bias, eps, normed):
    # One task per thread (``parts`` of them). Many rows: each task takes a band of rows, multiplies it
    # (unless ``sgemm`` is None: then NumPy has filled y already) and applies the epilogue to the rows
    # it has just written. Few rows: the tasks take bands of columns (whole multiples of column_unit),
    # then all rows get their epilogue. Cutting bands into blocks of 32-256 rows, to apply the epilogue
    # while still in L1/L2, was slower.
    rows, columns = y.shape
    if sgemm is not None and rows < MIN_ROWS_PER_THREAD * parts:
        units = (columns + column_unit - 1) // column_unit
        parts = min(parts, units)
        for part in prange(parts):
            product_block(sgemm, x, 0, weight, y, 0, rows, units * part // parts * column_unit,
                          min(columns, units * (part + 1) // parts * column_unit))
        if epilogue != _EPILOGUE_NONE:
            for part in prange(parts):
                epilogue_rows(y, rows * part // parts, rows * (part + 1) // parts, epilogue, bias, activation, scale,
                              residual, norm_weight, norm_bias, eps, normed)
        return
    parts = min(parts, rows)
    for part in prange(parts):
        first = rows * part // parts
        stop = rows * (part + 1) // parts
        if sgemm is not None:
            product_block(sgemm, x, first, weight, y, first, stop - first, 0, columns)
        epilogue_rows(y, first, stop, epilogue, bias, activation, scale, residual, norm_weight, norm_bias, eps, normed)


NO_BIAS = np.empty(0, np.float32)  # stand-ins for the operands an epilogue does not read
NO_ROWS = np.empty((0, 0), np.float32)


def _floats(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _run_linear(
    x: np.ndarray, weight: np.ndarray | gemm.PackedWeight, epilogue: int, bias: np.ndarray = NO_BIAS,
    activation: int = 0, scale: np.ndarray = NO_BIAS, residual: np.ndarray = NO_ROWS,
    norm_weight: np.ndarray = NO_BIAS, norm_bias: np.ndarray = NO_BIAS, eps: float = 0.0,
    normed: np.ndarray = NO_ROWS,
) -> np.ndarray:
    """``x @ weight`` over the last axis of ``x`` as ``(rows, out)``, with ``epilogue`` applied in place."""
    # BLAS reads raw row-major memory, and the epilogue band takes C-contiguous float32: operands are made so
    # (no copy when they are).
    x = _floats(x.reshape(-1, x.shape[-1]))
    bias, scale, residual, norm_weight, norm_bias = map(_floats, (bias, scale, residual, norm_weight, norm_bias))
    y = aligned_empty((x.shape[0], weight.shape[1]))
    operand = weight_operand(weight)
    sgemm = kernel_sgemm()
    if sgemm is None:
        np.matmul(x, operand, out=y)
        if epilogue == _EPILOGUE_NONE:
            return y
    with launching(products_blas()):
        _linear(_epilogue_rows, sgemm, thread_count(), column_unit(), x, operand, y, epilogue, bias,
                activation, scale, residual, norm_weight, norm_bias, np.float32(eps), normed)
    return y


def _bias_or_zeros(linear: Linear) -> np.ndarray:
    """The layer's bias, or zeros for a layer without one (the epilogues always add one)."""
    return np.zeros(linear.weight.shape[1], np.float32) if linear.bias is None else linear.bias


def linear(x: np.ndarray, linear: Linear, activation: str = "identity") -> np.ndarray:
    """``activation(x @ linear.weight + linear.bias)`` over the last axis of ``x``; bias and activation in one pass."""
    weight, bias = linear
    if bias is None and activation == "identity":
        y = _run_linear(x, weight, _EPILOGUE_NONE)
    else:
        y = _run_linear(x, weight, _EPILOGUE_ACTIVATION, _bias_or_zeros(linear), activation_code(activation))
    return y.reshape(x.shape[:-1] + (y.shape[1],))


def _norm_operands(norm: Norm | None, rows: np.ndarray) -> tuple[int, tuple]:
    """The epilogue that closes a residual branch, and its LayerNorm operands (stand-ins without ``norm``)."""
    if norm is None:
        return _EPILOGUE_RESIDUAL, (NO_BIAS, NO_BIAS, 0.0, NO_ROWS)
    return _EPILOGUE_RESIDUAL_NORM, (norm.weight, norm.bias, norm.eps, aligned_empty(rows.shape))


def linear_residual(
    x: np.ndarray, linear: Linear, scale: np.ndarray, residual: np.ndarray, norm: Norm | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``out = residual + scale * (x @ linear.weight + linear.bias)``, and ``layer_norm(out, norm)`` in the same
    pass over the rows when ``norm`` is given: ``(out, normed or None)``, shaped like ``residual``."""
    rows = residual.reshape(-1, residual.shape[-1])
    epilogue, (norm_weight, norm_bias, eps, normed) = _norm_operands(norm, rows)
    y = _run_linear(x, linear.weight, epilogue, _bias_or_zeros(linear), 0, scale, rows, norm_weight, norm_bias, eps,
                    normed)
    return y.reshape(residual.shape), None if norm is None else normed.reshape(residual.shape)


# A transformer MLP is two products around an activation on rows four times as wide as the stream: in
# stage 1 at batch 8 that hidden activation is 25 MB, written by fc1, re-read and rewritten by the
# activation, re-read by fc2. Here each thread takes blocks of this many rows through fc1, the activation
# and fc2 while the block's hidden rows are still in L2 (512 KiB in dinat-mini's stage 1, 2 MiB in its
# stage 3): faster at batch 8, batch 1 unchanged. Smaller blocks pay BLAS's per-call cost (the weights
# packed again for every block) more often; larger ones gained nothing.
_MLP_BLOCK_ROWS = 512


@njit(parallel=True, **FAST)
def _mlp(epilogue_rows, sgemm, parts, x, fc1, fc1_bias, activation, fc2, hidden, y, epilogue, bias, scale, residual,
         norm_weight, norm_bias, eps, normed):
    # ``hidden`` holds one block of rows per thread; each task is one thread's band of rows.
    rows = x.shape[0]
    block = hidden.shape[0] // parts
    for part in prange(parts):
        own = part * block  # this thread's first row in ``hidden``
        for start in range(rows * part // parts, rows * (part + 1) // parts, block):
            count = min(block, rows * (part + 1) // parts - start)
            product_block(sgemm, x, start, fc1, hidden, own, count, 0, hidden.shape[1])
            epilogue_rows(hidden, own, own + count, _EPILOGUE_ACTIVATION, fc1_bias, activation, scale, residual,
                          norm_weight, norm_bias, eps, normed)  # the operands after fc1_bias go unread
            product_block(sgemm, hidden, own, fc2, y, start, count, 0, y.shape[1])
            epilogue_rows(y, start, start + count, epilogue, bias, 0, scale, residual, norm_weight, norm_bias, eps,
                          normed)


def _run_mlp(
    x: np.ndarray, fc1: np.ndarray | gemm.PackedWeight, fc1_bias: np.ndarray, activation: str,
    fc2: np.ndarray | gemm.PackedWeight, epilogue: int, bias: np.ndarray, scale: np.ndarray, residual: np.ndarray,
    norm_weight: np.ndarray = NO_BIAS, norm_bias: np.ndarray = NO_BIAS, eps: float = 0.0,
    normed: np.ndarray = NO_ROWS,
) -> np.ndarray:
    """``activation(x @ fc1 + fc1_bias) @ fc2`` as ``(rows, out)``, with ``epilogue`` applied in place."""
    code = activation_code(activation)
    x = _floats(x.reshape(-1, x.shape[-1]))
    parts = thread_count()
    sgemm = kernel_sgemm()
    if sgemm is None or x.shape[0] < MIN_ROWS_PER_THREAD * parts:  # few rows: the products split columns
        hidden = _run_linear(x, fc1, _EPILOGUE_ACTIVATION, fc1_bias, code)
        return _run_linear(hidden, fc2, epilogue, bias, 0, scale, residual, norm_weight, norm_bias, eps, normed)
    fc1_bias, bias, scale, residual, norm_weight, norm_bias = map(
        _floats, (fc1_bias, bias, scale, residual, norm_weight, norm_bias))
    block = min(_MLP_BLOCK_ROWS, -(-x.shape[0] // parts))
    hidden = aligned_empty((parts * block, fc1.shape[1]))
    y = aligned_empty((x.shape[0], fc2.shape[1]))
    with launching(products_blas()):
        _mlp(_epilogue_rows, sgemm, parts, x, weight_operand(fc1), fc1_bias, code, weight_operand(fc2), hidden, y,
             epilogue, bias, scale, residual, norm_weight, norm_bias, np.float32(eps), normed)
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
    y = _run_mlp(x, fc1.weight, _bias_or_zeros(fc1), activation, fc2.weight, epilogue, _bias_or_zeros(fc2), scale,
                 rows, norm_weight, norm_bias, eps, normed)
    return y.reshape(residual.shape), None if norm is None else normed.reshape(residual.shape)

