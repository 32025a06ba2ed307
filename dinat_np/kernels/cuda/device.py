"""What every CUDA op uses: the GPU check, the lock around launches, allocation and launch sizes, and
CuPy where it is installed (its cuBLAS does the products, its memory pool backs the arrays).

Every op holds ``LOCK`` while it allocates and launches: numba-cuda's allocation/deallocation
bookkeeping and its simulator are not made for concurrent use, and two model calls from two Python
threads then interleave op by op on the (ordered) default stream.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import numba_cuda  # the NVIDIA-maintained CUDA target: without it, ImportError -> clear error
from numba import __version__ as numba_version, config, cuda, types
from numba.core.errors import NumbaPerformanceWarning

# numba-cuda takes over `numba.cuda` through an import hook that a .pth file installs at start-up. Where
# that file is not processed (site-packages put on sys.path by hand, PYTHONPATH), `numba.cuda` is numba's
# own deprecated target, whose compiler (numba >= 0.66) rejects two-argument min/max in kernels with an
# obscure "Signature mismatch".
if not Path(cuda.__file__).resolve().is_relative_to(Path(numba_cuda.__file__).resolve().parent):
    raise ImportError(
        f"numba.cuda is numba's own deprecated CUDA target ({cuda.__file__}), not numba-cuda's: numba-cuda's "
        "start-up hook (_numba_cuda_redirector.pth) did not run; install numba-cuda into a site-packages "
        "directory of this Python (pip install 'numba-cuda[cu12]')"
    )

SIMULATOR: bool = bool(config.ENABLE_CUDASIM)  # numba.cuda's simulator (NUMBA_ENABLE_CUDASIM=1)
if not SIMULATOR:  # the simulator has neither, and never uses CuPy (below), the one user of both
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.cudadrv.driver import MemoryPointer, binding

LOCK = threading.RLock()

# Small feature maps (late stages, batch 1) launch fewer blocks than the GPU has SMs; that is expected
# and numba's per-launch warning about it would only be noise for users.
# (The message may start with terminal colour codes, hence the leading ".*".)
warnings.filterwarnings("ignore", message=r".*Grid size .* low occupancy", category=NumbaPerformanceWarning)

# Element-wise kernels loop over their elements with a grid stride, so any launch covers them; the grid
# is capped to keep blocks busy on the GPU. The simulator runs every thread as a Python thread: there
# smaller launches keep the tests quick while still exercising the stride loops across blocks.
THREADS = 64 if SIMULATOR else 256
_MAX_BLOCKS = 2 if SIMULATOR else 8192

# float32 constants: a bare Python float would turn the kernels' arithmetic into float64.
ZERO = np.float32(0.0)
ONE = np.float32(1.0)


# ---------------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------------
_gpu_checked = False


@cuda.jit
def _smoke_kernel(x):
    index = cuda.grid(1)
    if index < x.shape[0]:
        x[index] = x[index] * np.float32(2.0) + ONE


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(" :") or type(error).__name__


def require_gpu() -> None:
    """Raise a clear RuntimeError unless a CUDA GPU can compile and run this backend's kernels.

    Checked once per process: the driver must find a device, and a tiny kernel must compile (NVVM and
    libdevice present) and give the right numbers.
    """
    global _gpu_checked
    if _gpu_checked or SIMULATOR:
        return
    with LOCK:
        if _gpu_checked:
            return
        try:
            cuda.current_context()
        except Exception as error:  # CudaSupportError and driver errors: no usable GPU here
            raise RuntimeError(
                f"device='cuda' needs an NVIDIA GPU with a working driver, and numba-cuda found none "
                f"({_one_line(error)}). Use device='cpu' instead."
            ) from None
        try:
            probe = cuda.to_device(np.arange(4, dtype=np.float32))
            _smoke_kernel[1, 32](probe)
            result = probe.copy_to_host()
        except Exception as error:
            raise RuntimeError(
                f"device='cuda': a GPU was found but numba-cuda could not compile or run a kernel on it "
                f"({_one_line(error)}). The usual causes: the CUDA toolkit wheels are missing or do not match "
                "the driver (pip install 'numba-cuda[cu12]', or 'numba-cuda[cu13]' for CUDA 13 drivers), or "
                f"numba {numba_version} does not support numpy {np.__version__} (install a numpy it supports)"
            ) from None
        if not np.array_equal(result, np.arange(4, dtype=np.float32) * 2 + 1):
            raise RuntimeError(f"the GPU returned wrong numbers from a test kernel: {result}")
        _gpu_checked = True


# ---------------------------------------------------------------------------------------------------
# CuPy, allocation, launch sizes, indexing
# ---------------------------------------------------------------------------------------------------
def _import_cupy() -> Any | None:
    """CuPy when it is importable on a real GPU and not turned off by ``DINAT_NP_USE_CUPY=0``; else None."""
    if SIMULATOR or os.environ.get("DINAT_NP_USE_CUPY", "1") == "0":
        return None
    try:
        import cupy
    except Exception:  # not installed, or installed without a matching CUDA runtime
        return None
    return cupy


CUPY: Any | None = _import_cupy()


_context: Any = None  # numba's context of the GPU in use, taken at the first allocation
_array_types: dict[int, types.Array] = {}


def empty(shape: tuple[int, ...]) -> Any:
    """An uninitialised float32 device array (the caller holds ``LOCK``).

    With CuPy, from its memory pool: numba's own allocator calls cuMemAlloc for every array and frees
    them in batches through cuMemFree, which waits for the GPU (docs/performance.md#gpu).
    """
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    if CUPY is None or size == 0:
        return cuda.device_array(shape, dtype=np.float32)
    global _context
    if _context is None:
        _context = cuda.current_context()
    memory = CUPY.cuda.alloc(4 * size)
    # The pointer holds `memory`: when the last array over it goes, the block returns to CuPy's pool,
    # reusable by later launches on the same (default) stream, where numba's kernels run too.
    return _c_contiguous(MemoryPointer(_context, binding.CUdeviceptr(memory.ptr), 4 * size, owner=memory), shape)


def reshaped(array: Any, shape: tuple[int, ...]) -> Any:
    """``array.reshape(shape)`` for a C-contiguous float32 device array (one ``-1`` allowed)."""
    shape = tuple(int(s) for s in shape)
    if -1 in shape:
        known = -math.prod(shape)  # the product of the other sizes
        shape = tuple(array.size // known if s == -1 and known > 0 else s for s in shape)
    if math.prod(shape) != array.size:
        raise ValueError(f"cannot reshape a device array of shape {tuple(array.shape)} into {shape}")
    if CUPY is None or array.dtype != np.float32 or not array.is_c_contiguous():
        return array.reshape(shape)
    return _c_contiguous(array.gpu_data, shape)


def _c_contiguous(pointer: MemoryPointer, shape: tuple[int, ...]) -> Any:
    # Built directly: numba's own constructors (from_cuda_array_interface, reshape) and its typing of
    # each new array at its first launch spend tens of microseconds per call, and a batch-1 forward
    # makes hundreds of arrays (docs/performance.md#gpu). The type is the one numba would infer.
    strides = [4] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    array = DeviceNDArray(shape, tuple(strides), np.float32, gpu_data=pointer)
    array_type = _array_types.get(len(shape))
    if array_type is None:
        array_type = _array_types[len(shape)] = types.Array(types.float32, len(shape), "C")
    array.__dict__["_numba_type_"] = array_type  # fills numba's cached_property ahead
    return array


_placeholders: dict[int, Any] = {}


def placeholder(ndim: int) -> Any:
    """A one-element device array standing for an absent optional argument (no bias, no attention)."""
    array = _placeholders.get(ndim)
    if array is None:
        array = _placeholders[ndim] = cuda.to_device(np.zeros((1,) * ndim, np.float32))
    return array


def grid_blocks(count: int, threads: int = THREADS) -> int:
    """Blocks for a grid-stride launch over ``count`` items, ``threads`` per block."""
    return max(1, min(_MAX_BLOCKS, (count + threads - 1) // threads))


@cuda.jit(device=True)
def unravel_nhwc(index, height, width, channels):
    """Position (b, i, j, c) of a flat index into a channels-last (batch, height, width, channels) array."""
    c = index % channels
    rest = index // channels
    j = rest % width
    rest //= width
    return rest // height, rest % height, j, c
