"""NumPy's own OpenBLAS, called from inside the CPU kernels (one single-threaded product per thread).

Products through NumPy run on OpenBLAS's thread pool, the other kernels on Numba's, and the two pools
hand the same cores back and forth about ninety times per forward, each hand-over a cost of its own
(a tenth of a batch-1 forward in all). Calling ``sgemm`` from Numba's threads, each
on its own share of the product while OpenBLAS is set to one thread, keeps everything on one pool, and
lets a kernel finish the product's epilogue (bias, GELU, residual, LayerNorm) on rows still in cache.

This needs the OpenBLAS that NumPy's wheels bundle (``numpy.libs`` / ``numpy/.dylibs``): the same
library NumPy already loaded, so no second thread pool appears, with ``openblas_set_num_threads_local``
(OpenBLAS >= 0.3.27: sets the thread count and returns the previous one in one call). Where it is not
found (NumPy built against MKL, Accelerate or a system BLAS) ``NUMPY_OPENBLAS`` is None and the products
go through NumPy; ``DINAT_NP_NUMPY_BLAS=1`` asks for that explicitly.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numba import typeof, types

# cblas_sgemm's enums: row-major storage, no transposition.
ROW_MAJOR = 101
NO_TRANS = 111


def _address_of(function: KernelFunction) -> int:
    return function.address


class KernelFunction:
    """A C function that kernels receive as an argument and call natively, as they would a ctypes function. A
    ctypes function is typed and cast to its address by Python code at every launch (~4 us, ~70 launches a
    forward); this object's Numba type is read from ``_numba_type_`` in C, and its address from an attribute."""

    __slots__ = ("function", "address", "_numba_type_")

    def __init__(self, function: ctypes._CFuncPtr) -> None:
        self.function = function  # keeps the code the address points to alive
        self.address = ctypes.cast(function, ctypes.c_void_p).value
        ctypes_type = typeof(function)
        self._numba_type_ = types.ExternalFunctionPointer(ctypes_type.sig, _address_of, ctypes_type.cconv)

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)


class Blas(NamedTuple):
    """NumPy's OpenBLAS: ``sgemm`` for the kernels."""

    sgemm: KernelFunction  # cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    set_num_threads: ctypes._CFuncPtr  # int openblas_set_num_threads_local(int): sets, returns the previous


def sgemm_prototype(integer: type) -> type:
    """The ctypes prototype of ``cblas_sgemm`` with integers of type ``integer``."""
    return ctypes.CFUNCTYPE(
        None, ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, ctypes.c_float,
        ctypes.c_void_p, integer, ctypes.c_void_p, integer, ctypes.c_float, ctypes.c_void_p, integer,
    )


# (symbol, integer width): scipy-openblas as bundled by NumPy >= 2 (64-bit integers), then plain OpenBLAS.
_SGEMM_SYMBOLS = (
    ("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm", ctypes.c_int),
)


def _bundled_openblas() -> list[Path]:
    """OpenBLAS files shipped inside NumPy's wheel (Linux/Windows ``numpy.libs``, macOS ``numpy/.dylibs``)."""
    numpy_dir = Path(np.__file__).resolve().parent
    folders = (numpy_dir.parent / "numpy.libs", numpy_dir / ".dylibs")
    return sorted(
        path for folder in folders if folder.is_dir() for path in folder.iterdir() if "openblas" in path.name
    )


def numpy_products_asked() -> bool:
    """Whether ``DINAT_NP_NUMPY_BLAS`` asks for the products through NumPy's matmul."""
    return os.environ.get("DINAT_NP_NUMPY_BLAS", "") not in ("", "0")


def find_blas() -> Blas | None:
    """NumPy's bundled OpenBLAS, or None where it cannot be used from the kernels (see the module docstring)."""
    if numpy_products_asked():
        return None
    for path in _bundled_openblas():
        try:
            library = ctypes.CDLL(str(path))  # already loaded by NumPy: the same handle, the same thread pool
        except OSError:
            continue
        if not hasattr(library, "openblas_set_num_threads_local"):
            continue
        for symbol, integer in _SGEMM_SYMBOLS:
            if hasattr(library, symbol):
                sgemm = sgemm_prototype(integer)((symbol, library))
                set_num_threads = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
                return Blas(KernelFunction(sgemm), set_num_threads(("openblas_set_num_threads_local", library)))
    return None


# Looked up once, when the kernels load; the threading layer's spin and the product kernels both follow it.
NUMPY_OPENBLAS = find_blas()


# OpenBLAS's idle threads spin for 2**OPENBLAS_THREAD_TIMEOUT cycles after each product (2**28 by default,
# ~0.1 s), taking cores from the kernels that follow; 4 is OpenBLAS's shortest spin. An explicit setting wins.
THREAD_TIMEOUT = 4


def bound_idle_spin() -> bool:
    """Give NumPy's OpenBLAS the short idle spin whatever the import order: the environment variable is
    read when OpenBLAS loads, so where NumPy loaded it first, OpenBLAS reads its environment again through
    its own API and its threads restart with the setting (as after a fork). Returns whether it acted."""
    timeout = os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", str(THREAD_TIMEOUT))
    for path in _bundled_openblas():
        try:
            library = ctypes.CDLL(str(path))  # already loaded by NumPy: the same handle
        except OSError:
            continue
        if not all(hasattr(library, name) for name in ("openblas_thread_timeout", "openblas_read_env",
                                                        "blas_thread_shutdown_")):
            continue
        if str(library.openblas_thread_timeout()) == timeout:
            return False  # loaded with it (dinat_np came first, or the user set it)
        library.openblas_read_env()
        library.blas_thread_shutdown_()  # its threads start again, with the new spin, at the next product
        return True
    return False
