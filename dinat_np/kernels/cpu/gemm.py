"""The CPU kernels' own float32 matrix product, on x86-64 CPUs with fused multiply-add vectors (AVX2 and
FMA, or AVX-512).

A product ``y = x @ weight`` is computed tile by tile: six rows of ``y`` by ``TILE_COLUMNS`` columns (four
16-lane vectors with AVX-512, two 8-lane ones with AVX2: 24 or 12 accumulators, BLIS's tile shapes) are
held in registers while ``k`` runs over the shared dimension: per ``k``, one row of the weight's columns
under the tile and six broadcast elements of ``x`` feed the tile's fused multiply-adds. The ``k`` loop is
unrolled by four, so that the six rows of ``x`` are read at fixed offsets from one pointer (one ``k`` per
iteration, LLVM walked them with a chain of additions: a third slower with 8 lanes).

The weight is packed once, when a model loads (:func:`pack`): its columns in panels of ``TILE_COLUMNS``,
each panel the whole depth, row after row, so that a tile reads its weights as one sequential stream.
OpenBLAS packs its operands at every call, and so did this product until 2026-12-06; packed once, it runs
dinat-mini's products faster than NumPy's OpenBLAS with either vector width (docs/perf-journal.md). A
thread takes its rows in chunks whose ``x`` stays in L2 while every panel passes over it, ``_PANEL_DEPTH``
rows of ``k`` at a time (that much of the panel stays in L1 across the chunk's tiles).

Each output element is the sum over ``k`` in order, one fused multiply-add at a time, whatever the thread
count, chunking or panel depth.
"""

from __future__ import annotations

import ctypes
import threading
from typing import NamedTuple

import numpy as np
from numba import carray, cfunc, njit, types

from .blas import NUMPY_OPENBLAS, KernelFunction, numpy_products_asked, sgemm_prototype
from .simd import FAST, FMA_VECTORS, LANES, WIDE_VECTORS, broadcast, fma, load, scratch, splat, store


def _products() -> str:
    if numpy_products_asked():
        return "numpy"
    if FMA_VECTORS:
        return "own"
    return "numpy" if NUMPY_OPENBLAS is None else "openblas"


# Where the CPU backend's matrix products run: "own" (this module's product, inside the kernels) on x86-64
# CPUs with AVX2 and FMA or with AVX-512; else "openblas" (NumPy's OpenBLAS called from the kernels, see
# ``blas``) where it can be found (ARM, older x86-64: not measured against it, so OpenBLAS's own kernels);
# else, or with DINAT_NP_NUMPY_BLAS=1, "numpy" (NumPy's matmul, before the kernel that applies the epilogue).
PRODUCTS = _products()

TILE_ROWS = 6
_TILE_VECTORS = 4 if WIDE_VECTORS else 2
TILE_COLUMNS = _TILE_VECTORS * LANES  # a panel's width: 64 with AVX-512, 16 with AVX2
# Rows of k per pass over a chunk: 32 KiB of a 64-column panel, 16 KiB of a 16-column one (with 8 lanes,
# 256 was faster than the whole depth at stages 3 and 4; with 16, deeper than 128 was slower on stage
# 4's fc2).
_PANEL_DEPTH = 128 if WIDE_VECTORS else 256
_CHUNK_FLOATS = 65536  # a chunk's rows of x, one panel deep: 256 KiB, in L2


class PackedWeight(NamedTuple):
    """An ``(in, out)`` weight matrix as the own product reads it (made by :func:`pack`)."""

    panels: np.ndarray  # (panel count * in, TILE_COLUMNS): panel p is columns p * TILE_COLUMNS... of every row
    shape: tuple[int, int]  # the matrix's (in, out)

    def matrix(self) -> np.ndarray:
        """The ``(in, out)`` matrix it packs."""
        depth, columns = self.shape
        count = -(-columns // TILE_COLUMNS)
        panels = self.panels.reshape(count, depth, TILE_COLUMNS)
        return np.ascontiguousarray(panels.transpose(1, 0, 2).reshape(depth, count * TILE_COLUMNS)[:, :columns])


def pack(matrix: np.ndarray) -> PackedWeight:
    """``matrix`` ``(in, out)`` (any strides: a transposed view is copied once, straight into the panels) in
    panels of ``TILE_COLUMNS`` columns, zeros right of the last column, each panel's rows one after the
    other, starting on a cache line."""
    depth, columns = matrix.shape
    count = -(-columns // TILE_COLUMNS)
    whole = columns // TILE_COLUMNS
    panels = scratch(count * depth * TILE_COLUMNS).reshape(count, depth, TILE_COLUMNS)
    panels[:whole] = matrix[:, : whole * TILE_COLUMNS].reshape(depth, whole, TILE_COLUMNS).transpose(1, 0, 2)
    if whole < count:  # the last panel: the columns left, then zeros
        panels[whole] = 0.0
        panels[whole, :, : columns - whole * TILE_COLUMNS] = matrix[:, whole * TILE_COLUMNS :]
    return PackedWeight(panels.reshape(count * depth, TILE_COLUMNS), (depth, columns))


# A tile row is a tuple of _TILE_VECTORS vectors (Numba prunes the branch of the other width). The helpers
# called at many sites are plain functions, which LLVM inlines into the C function: Numba's own inlining
# copies a callee's code into each call site and processes it again there, and through the unrolled loop
# that made the product's cold compile 4.4-5.1 s instead of 1.7-2.0. A plain callee's code is also loaded
# apart from the C function's, and two copies of code that rounds may differ (band.py); these only move
# floats or fuse multiply-adds, one rounding each, the same from any copy.
@njit(**FAST)
def _load_row(array, at, lanes):
    # a tile row's floats from array.flat[at:], zeros beyond ``lanes``
    if _TILE_VECTORS == 2:
        return load(array, at, lanes), load(array, at + LANES, lanes - LANES)
    return (load(array, at, lanes), load(array, at + LANES, lanes - LANES),
            load(array, at + 2 * LANES, lanes - 2 * LANES), load(array, at + 3 * LANES, lanes - 3 * LANES))


@njit(**FAST)
def _store_row(array, at, lanes, row):
    store(array, at, lanes, row[0])
    store(array, at + LANES, lanes - LANES, row[1])
    if _TILE_VECTORS == 4:
        store(array, at + 2 * LANES, lanes - 2 * LANES, row[2])
        store(array, at + 3 * LANES, lanes - 3 * LANES, row[3])


@njit(**FAST)
def _multiply_add(element, weights, row):
    if _TILE_VECTORS == 2:
        return fma(element, weights[0], row[0]), fma(element, weights[1], row[1])
    return (fma(element, weights[0], row[0]), fma(element, weights[1], row[1]), fma(element, weights[2], row[2]),
            fma(element, weights[3], row[3]))


@njit(inline="always", **FAST)
def _start_row(y, at, lanes, first_k):
    # a tile row's accumulators: zeros at the first panel rows, else the sums so far
    if first_k == 0:
        zero = splat(0.0)
        if _TILE_VECTORS == 2:
            return zero, zero
        return zero, zero, zero, zero
    return _load_row(y, at, lanes)


@njit(**FAST)
def _six_steps(x, x_at, x_stride, panel, panel_at, rows):
    # one k: the six rows' accumulators += x[row, k] * the panel's row (x_at: row 0's element k)
    weights = _load_row(panel, panel_at, TILE_COLUMNS)
    return (_multiply_add(broadcast(x, x_at), weights, rows[0]),
            _multiply_add(broadcast(x, x_at + x_stride), weights, rows[1]),
            _multiply_add(broadcast(x, x_at + 2 * x_stride), weights, rows[2]),
            _multiply_add(broadcast(x, x_at + 3 * x_stride), weights, rows[3]),
            _multiply_add(broadcast(x, x_at + 4 * x_stride), weights, rows[4]),
            _multiply_add(broadcast(x, x_at + 5 * x_stride), weights, rows[5]))


@njit(inline="always", **FAST)
def _six_rows(x, x_at, x_stride, panel, panel_at, first_k, stop_k, y, y_at, y_stride, lanes):
    # y's six rows from y_at (``y_stride`` apart), ``lanes`` columns: += x's six rows from x_at (``x_stride``
    # apart) times the panel's rows first_k..stop_k - 1 (its row k at panel_at + k * TILE_COLUMNS)
    rows = (_start_row(y, y_at, lanes, first_k), _start_row(y, y_at + y_stride, lanes, first_k),
            _start_row(y, y_at + 2 * y_stride, lanes, first_k), _start_row(y, y_at + 3 * y_stride, lanes, first_k),
            _start_row(y, y_at + 4 * y_stride, lanes, first_k), _start_row(y, y_at + 5 * y_stride, lanes, first_k))
    k = first_k
    while k + 4 <= stop_k:
        rows = _six_steps(x, x_at + k, x_stride, panel, panel_at + k * TILE_COLUMNS, rows)
        rows = _six_steps(x, x_at + k + 1, x_stride, panel, panel_at + (k + 1) * TILE_COLUMNS, rows)
        rows = _six_steps(x, x_at + k + 2, x_stride, panel, panel_at + (k + 2) * TILE_COLUMNS, rows)
        rows = _six_steps(x, x_at + k + 3, x_stride, panel, panel_at + (k + 3) * TILE_COLUMNS, rows)
        k += 4
    while k < stop_k:
        rows = _six_steps(x, x_at + k, x_stride, panel, panel_at + k * TILE_COLUMNS, rows)
        k += 1
    row0, row1, row2, row3, row4, row5 = rows
    _store_row(y, y_at, lanes, row0)
    _store_row(y, y_at + y_stride, lanes, row1)
    _store_row(y, y_at + 2 * y_stride, lanes, row2)
    _store_row(y, y_at + 3 * y_stride, lanes, row3)
    _store_row(y, y_at + 4 * y_stride, lanes, row4)
    _store_row(y, y_at + 5 * y_stride, lanes, row5)


@njit(inline="always", **FAST)
def _one_row(x, x_at, panel, panel_at, first_k, stop_k, y, y_at, lanes):
    # _six_rows for the last rows of a chunk, one at a time
    row = _start_row(y, y_at, lanes, first_k)
    for k in range(first_k, stop_k):
        row = _multiply_add(broadcast(x, x_at + k), _load_row(panel, panel_at + k * TILE_COLUMNS, TILE_COLUMNS), row)
    _store_row(y, y_at, lanes, row)


@njit(inline="always", **FAST)
def _product(x, x_stride, panels, y, y_stride, rows, columns, depth):
    # y[r * y_stride + c] = sum over k of x[r * x_stride + k] * (column c of the packed panels, row k),
    # r < rows, c < columns
    chunk = max(TILE_ROWS, _CHUNK_FLOATS // max(1, min(depth, _PANEL_DEPTH)) // TILE_ROWS * TILE_ROWS)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        for col in range(0, columns, TILE_COLUMNS):
            lanes = min(TILE_COLUMNS, columns - col)
            panel_at = col * depth  # panel col / TILE_COLUMNS
            for first_k in range(0, max(depth, 1), _PANEL_DEPTH):  # depth 0: one empty pass, y = 0
                stop_k = min(depth, first_k + _PANEL_DEPTH)
                row = start
                while row + TILE_ROWS <= stop:
                    _six_rows(x, row * x_stride, x_stride, panels, panel_at, first_k, stop_k, y, row * y_stride + col,
                              y_stride, lanes)
                    row += TILE_ROWS
                for last_row in range(row, stop):
                    _one_row(x, last_row * x_stride, panels, panel_at, first_k, stop_k, y, last_row * y_stride + col,
                             lanes)


def _sgemm(order, trans_a, trans_b, rows, columns, depth, alpha, x, x_stride, panels, panels_stride, beta, y,
           y_stride):
    if rows > 0 and columns > 0:
        _product(carray(x, (rows - 1) * x_stride + depth), x_stride,
                 carray(panels, -(-columns // TILE_COLUMNS) * depth * TILE_COLUMNS),
                 carray(y, (rows - 1) * y_stride + columns), y_stride, rows, columns, depth)


_COMPILING = threading.Lock()
_compiled = None  # (the compiled C function, its KernelFunction): the code lives as long as that function object


def sgemm() -> KernelFunction:
    """This module's product as a ``cblas_sgemm`` with 64-bit integers, as in the OpenBLAS that NumPy >= 2
    bundles (so the kernels' calls through either compile alike). Only what the kernels ask for is
    implemented: row-major ``x`` and ``y``, alpha 1, beta 0, and the weight packed (``b`` points to the first
    panel of the columns asked for, ``ldb`` is ``TILE_COLUMNS``: see :func:`pack`).

    A C function rather than a Numba one: the kernels call it through a pointer, so its code is compiled
    once, not again inside each kernel that calls it (a much longer cold compile); and only when first
    asked for, by one thread.
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
