"""The CPU kernels' own float32 matrix product, for CPUs with 512-bit vectors (AVX-512).

A product ``y = x @ weight_t`` is computed tile by tile: six rows of ``y`` by 64 columns (four
16-lane vectors) are 24 accumulators held in registers while ``k`` runs over the shared dimension:
per ``k``, four vectors of ``weight_t`` and six broadcast elements of ``x`` feed 24 fused multiply-adds.
The 64 columns of ``weight_t`` under a tile are first copied into a contiguous panel, ``_PANEL_DEPTH``
rows of ``k`` at a time, so that the tile reads them sequentially from L1 instead of one row of
``weight_t`` apart each (read in place, the long products ran far slower). A thread takes its rows
in chunks whose ``x`` stays in L2 while every panel passes over it.

Why not OpenBLAS: with 512-bit vectors this product runs dinat-mini's shapes faster than NumPy's
OpenBLAS (SkylakeX kernels), the most where the shared dimension is short (64 in stage 1), and whole
forwards with it. With 256-bit vectors (AVX2) the 24 accumulators need 48 of the 16 registers and it
runs far slower than OpenBLAS: hence ``WIDE_VECTORS``. A tile sized for AVX2 (6 rows by 16 columns)
was at best OpenBLAS's equal in the model (AMD and Intel), up to 5% slower at batch 8, and seconds more
of cold compile: not kept (docs/perf-journal.md).

Each output element is the sum over ``k`` in order, one fused multiply-add at a time, whatever the
thread count, chunking or panel depth.
"""

from __future__ import annotations

import ctypes
import threading

from numba import carray, cfunc, njit, types

from .blas import NUMPY_OPENBLAS, KernelFunction, numpy_products_asked, sgemm_prototype
from .simd import FAST, LANES, WIDE_VECTORS, broadcast, fma, load, scratch, splat, store


def _products() -> str:
    if numpy_products_asked():
        return "numpy"
    if WIDE_VECTORS:
        return "own"
    return "numpy" if NUMPY_OPENBLAS is None else "openblas"


# Where the CPU backend's matrix products run: "own" (this module's product, inside the kernels) on CPUs
# with 512-bit vectors; else "openblas" (NumPy's OpenBLAS called from the kernels, see ``blas``) where it
# can be found; else, or with DINAT_NP_NUMPY_BLAS=1, "numpy" (NumPy's matmul, before the kernel that
# applies the epilogue).
PRODUCTS = _products()

_TILE_ROWS = 6
_TILE_COLUMNS = 4 * LANES
# Rows of k per panel: 128 x 64 floats = 32 KiB, in L1 beside the tile's rows of x (deeper panels, or
# the whole depth at once, were slower on the deepest product, stage 4's fc2).
_PANEL_DEPTH = 128
_CHUNK_FLOATS = 65536  # a chunk's rows of x, one panel deep: 256 KiB, in L2


@njit(inline="always", **FAST)
def _load_row(array, at, lanes):
    # up to 64 floats from array.flat[at:], zeros beyond ``lanes``
    return (load(array, at, lanes), load(array, at + LANES, lanes - LANES),
            load(array, at + 2 * LANES, lanes - 2 * LANES), load(array, at + 3 * LANES, lanes - 3 * LANES))


@njit(inline="always", **FAST)
def _store_row(array, at, lanes, row):
    store(array, at, lanes, row[0])
    store(array, at + LANES, lanes - LANES, row[1])
    store(array, at + 2 * LANES, lanes - 2 * LANES, row[2])
    store(array, at + 3 * LANES, lanes - 3 * LANES, row[3])


@njit(inline="always", **FAST)
def _multiply_add(element, panel_row, row):
    return (fma(element, panel_row[0], row[0]), fma(element, panel_row[1], row[1]),
            fma(element, panel_row[2], row[2]), fma(element, panel_row[3], row[3]))


@njit(inline="always", **FAST)
def _start_row(y, at, lanes, first_k):
    # a tile row's accumulators: zeros at the first panel, else the sums so far
    if first_k == 0:
        zero = splat(0.0)
        return (zero, zero, zero, zero)
    return _load_row(y, at, lanes)


# Inlined, like every Numba function the C function calls that computes with floats (``scratch`` only
# allocates): a callee compiled on its own would be loaded in a process that compiled the product, but not
# in one that loaded it from the cache, and the two copies round differently (see band.py).
@njit(inline="always", **FAST)
def _six_rows(x, x_at, x_stride, panel, first_k, stop_k, y, y_at, y_stride, lanes):
    # y's six rows from y_at (``y_stride`` apart), ``lanes`` columns: += x's six rows from x_at
    # (``x_stride`` apart) times the panel (k = first_k..stop_k - 1)
    row0 = _start_row(y, y_at, lanes, first_k)
    row1 = _start_row(y, y_at + y_stride, lanes, first_k)
    row2 = _start_row(y, y_at + 2 * y_stride, lanes, first_k)
    row3 = _start_row(y, y_at + 3 * y_stride, lanes, first_k)
    row4 = _start_row(y, y_at + 4 * y_stride, lanes, first_k)
    row5 = _start_row(y, y_at + 5 * y_stride, lanes, first_k)
    for k in range(first_k, stop_k):
        panel_row = _load_row(panel, (k - first_k) * _TILE_COLUMNS, _TILE_COLUMNS)
        row0 = _multiply_add(broadcast(x, x_at + k), panel_row, row0)
        row1 = _multiply_add(broadcast(x, x_at + x_stride + k), panel_row, row1)
        row2 = _multiply_add(broadcast(x, x_at + 2 * x_stride + k), panel_row, row2)
        row3 = _multiply_add(broadcast(x, x_at + 3 * x_stride + k), panel_row, row3)
        row4 = _multiply_add(broadcast(x, x_at + 4 * x_stride + k), panel_row, row4)
        row5 = _multiply_add(broadcast(x, x_at + 5 * x_stride + k), panel_row, row5)
    _store_row(y, y_at, lanes, row0)
    _store_row(y, y_at + y_stride, lanes, row1)
    _store_row(y, y_at + 2 * y_stride, lanes, row2)
    _store_row(y, y_at + 3 * y_stride, lanes, row3)
    _store_row(y, y_at + 4 * y_stride, lanes, row4)
    _store_row(y, y_at + 5 * y_stride, lanes, row5)


@njit(inline="always", **FAST)
def _one_row(x, x_at, panel, first_k, stop_k, y, y_at, lanes):
    # _six_rows for the last rows of a chunk, one at a time
    row = _start_row(y, y_at, lanes, first_k)
    for k in range(first_k, stop_k):
        row = _multiply_add(broadcast(x, x_at + k), _load_row(panel, (k - first_k) * _TILE_COLUMNS, _TILE_COLUMNS), row)
    _store_row(y, y_at, lanes, row)


@njit(inline="always", **FAST)
def _product(x, x_stride, weight_t, weight_stride, y, y_stride, rows, columns, depth):
    # y[r * y_stride + c] = sum over k of x[r * x_stride + k] * weight_t[k * weight_stride + c], r < rows, c < columns
    panel_depth = max(1, min(depth, _PANEL_DEPTH))
    panel = scratch(panel_depth * _TILE_COLUMNS)
    chunk = max(_TILE_ROWS, _CHUNK_FLOATS // panel_depth // _TILE_ROWS * _TILE_ROWS)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        for col in range(0, columns, _TILE_COLUMNS):
            lanes = min(_TILE_COLUMNS, columns - col)
            for first_k in range(0, max(depth, 1), _PANEL_DEPTH):  # depth 0: one empty panel, y = 0
                stop_k = min(depth, first_k + _PANEL_DEPTH)
                for k in range(first_k, stop_k):  # the panel: zeros right of the last column
                    _store_row(panel, (k - first_k) * _TILE_COLUMNS, _TILE_COLUMNS,
                               _load_row(weight_t, k * weight_stride + col, lanes))
                row = start
                while row + _TILE_ROWS <= stop:
                    _six_rows(x, row * x_stride, x_stride, panel, first_k, stop_k, y, row * y_stride + col, y_stride,
                              lanes)
                    row += _TILE_ROWS
                for last_row in range(row, stop):
                    _one_row(x, last_row * x_stride, panel, first_k, stop_k, y, last_row * y_stride + col, lanes)


def _sgemm(order, trans_a, trans_b, rows, columns, depth, alpha, x, x_stride, weight_t, weight_stride, beta, y,
           y_stride):
    if rows > 0 and columns > 0:
        _product(carray(x, (rows - 1) * x_stride + depth), x_stride,
                 carray(weight_t, max(depth - 1, 0) * weight_stride + columns), weight_stride,
                 carray(y, (rows - 1) * y_stride + columns), y_stride, rows, columns, depth)


_COMPILING = threading.Lock()
_compiled = None  # (the compiled C function, its KernelFunction): the code lives as long as that function object


def sgemm() -> KernelFunction:
    """This module's product as a ``cblas_sgemm`` with 64-bit integers, as in the OpenBLAS that NumPy >= 2
    bundles (so the kernels' calls through either compile alike). Only what the kernels ask for is
    implemented: row-major operands, neither transposed, alpha 1, beta 0.

    A C function rather than a Numba one: the kernels call it through a pointer, so its code is compiled
    once, not again inside each kernel that calls it (a much longer cold compile); and only when first
    asked for (on the CPUs that use it), by one thread.
    """
    global _compiled
    if _compiled is not None:  # every product op asks: no lock once compiled
        return _compiled[1]
    with _COMPILING:
        if _compiled is None:
            floats = types.CPointer(types.float32)
            signature = types.void(types.intc, types.intc, types.intc, types.int64, types.int64, types.int64,
                                   types.float32, floats, types.int64, floats, types.int64, types.float32, floats,
                                   types.int64)
            function = cfunc(signature, **FAST)(_sgemm)
            _compiled = (function, KernelFunction(sgemm_prototype(ctypes.c_int64)(function.address)))
        return _compiled[1]
