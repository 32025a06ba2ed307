"""CUDA backend: numba.cuda kernels for every op of the forward pass, same op names and signatures as ``cpu``.

Backend arrays are numba device arrays. ``upload`` copies a host array to the GPU once (the model uploads
its weights when it is built, so they stay on the device); ``download`` returns a NumPy array. Layouts are
those of the CPU backend (see ``dinat_np.kernels.cpu``): channels-last activations, q/k/v as
``(batch, height, width, heads, head_dim)``, linear weights ``(in_features, out_features)``, 3x3
convolution weights ``(9 * in_channels, out_channels)`` in im2col (row, column, channel) order.

Kernels:
- dilated neighborhood attention with relative position bias, fused (the q/k/v product's bias, QK +
  rpb, softmax, AV): one warp per query, its lanes across the channels, the query's logits in shared
  memory, so the attention matrix reaches global memory only when it is asked for;
- a tiled shared-memory matrix product with the epilogues fused in: bias + activation, or
  ``residual + layer_scale * (y + bias)``; cuBLAS (through CuPy) replaces the product when CuPy is
  importable, the epilogue then runs as its own kernel;
- LayerNorm, the 3x3 stride-2 convolution (im2col kernel + the product), pad/crop/mean-pool/layout kernels.

The window geometry comes from ``common.window_starts`` (run on the host, cached on the device per
``(length, kernel_size, dilation)``), so both backends follow one copy of NATTEN's border rule.

Every op holds ``_LOCK`` while it allocates and launches: numba-cuda's allocation/deallocation
bookkeeping and its simulator are not made for concurrent use, and two model calls from two Python
threads then interleave op by op on the (ordered) default stream.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from typing import Any, Callable

import numpy as np

import numba_cuda  # noqa: F401  (the NVIDIA-maintained CUDA target: without it, ImportError -> clear error)
from numba import __version__ as numba_version, config, cuda, float32
from numba.core.errors import NumbaPerformanceWarning

from .common import (Conv, Epilogue, Linear, Norm, activation_code, check_qkv_bias, check_window, conv_weight_layout,
                     linear_weight_layout, window_starts)

__all__ = [
    "require_gpu", "upload", "download", "linear_weight", "conv_weight", "layer_norm", "linear",
    "linear_residual", "mlp_residual", "conv3x3_stride2", "neighborhood_attention",
    "na_qk", "na_av", "pad_bottom_right", "crop", "mean_pool", "nchw_to_nhwc",
]

SIMULATOR: bool = bool(config.ENABLE_CUDASIM)  # numba.cuda's simulator (NUMBA_ENABLE_CUDASIM=1)

_LOCK = threading.RLock()

# Small feature maps (late stages, batch 1) launch fewer blocks than the GPU has SMs; that is expected
# and numba's per-launch warning about it would only be noise for users.
# (The message may start with terminal colour codes, hence the leading ".*".)
warnings.filterwarnings("ignore", message=r".*Grid size .* low occupancy", category=NumbaPerformanceWarning)

# Element-wise kernels loop over their elements with a grid stride, so any launch covers them; the grid
# is capped to keep blocks busy on the GPU. The simulator runs every thread as a Python thread: there
# smaller launches keep the tests quick while still exercising the stride loops across blocks.
_THREADS = 64 if SIMULATOR else 256
_MAX_BLOCKS = 2 if SIMULATOR else 8192

# float32 constants: a bare Python float would turn the kernels' arithmetic into float64.
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_NEG_INF = np.float32(-np.inf)
_SQRT_HALF = np.float32(0.7071067811865476)
_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_CUBIC = np.float32(0.044715)
_SELU_ALPHA = np.float32(1.6732632423543772)
_SELU_SCALE = np.float32(1.0507009873554805)


# ---------------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------------
_gpu_checked = False


@cuda.jit
def _smoke_kernel(x):
    index = cuda.grid(1)
    if index < x.shape[0]:
        x[index] = x[index] * np.float32(2.0) + _ONE


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
    with _LOCK:
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
# Data movement
# ---------------------------------------------------------------------------------------------------
def _is_device_array(array: Any) -> bool:
    return hasattr(array, "copy_to_host")  # numba's device arrays and the simulator's fakes alike


def upload(array: Any) -> Any:
    """A float32 device copy of a host array (device arrays are returned as they are)."""
    if _is_device_array(array):
        return array
    with _LOCK:
        return cuda.to_device(np.ascontiguousarray(array, dtype=np.float32))


def download(array: Any) -> np.ndarray:
    """The host NumPy array of a backend array (waits for the kernels that write it)."""
    if isinstance(array, np.ndarray):
        return array
    with _LOCK:
        return array.copy_to_host()


def linear_weight(weight: np.ndarray) -> Any:
    """``(out, in)`` PyTorch weight -> ``(in, out)`` on the device, so a product is ``x @ weight_t``."""
    return upload(linear_weight_layout(weight))


def conv_weight(weight: np.ndarray) -> Any:
    """``(out, in, 3, 3)`` PyTorch weight -> ``(9 * in, out)`` on the device, rows in im2col order."""
    return upload(conv_weight_layout(weight))


def _empty(shape: tuple[int, ...]) -> Any:
    return cuda.device_array(tuple(int(s) for s in shape), dtype=np.float32)


_placeholders: dict[int, Any] = {}


def _placeholder(ndim: int) -> Any:
    """A one-element device array standing for an absent optional argument (no bias, no attention)."""
    array = _placeholders.get(ndim)
    if array is None:
        array = _placeholders[ndim] = cuda.to_device(np.zeros((1,) * ndim, np.float32))
    return array


def _blocks(count: int, threads: int = _THREADS) -> int:
    """Blocks for a grid-stride launch over ``count`` items, ``threads`` per block."""
    return max(1, min(_MAX_BLOCKS, (count + threads - 1) // threads))


# ---------------------------------------------------------------------------------------------------
# Layout kernels
# ---------------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _unravel_nhwc(index, height, width, channels):
    """Position (b, i, j, c) of a flat index into a channels-last (batch, height, width, channels) array."""
    c = index % channels
    rest = index // channels
    j = rest % width
    rest //= width
    return rest // height, rest % height, j, c


@cuda.jit
def _nchw_to_nhwc_kernel(x, out):
    batch, height, width, channels = out.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * height * width * channels, stride):
        b, i, j, c = _unravel_nhwc(index, height, width, channels)
        out[b, i, j, c] = x[b, c, i, j]


def nchw_to_nhwc(x: np.ndarray) -> Any:
    """Pixel values ``(batch, channels, height, width)`` (host) -> contiguous channels-last device array."""
    with _LOCK:
        device = cuda.to_device(np.ascontiguousarray(x, dtype=np.float32))
        batch, channels, height, width = device.shape
        out = _empty((batch, height, width, channels))
        _nchw_to_nhwc_kernel[_blocks(out.size), _THREADS](device, out)
        return out


@cuda.jit
def _top_left_kernel(x, out):
    # The top-left corner of x, zero where out reaches beyond it: a crop or a bottom-right pad.
    batch, height, width, channels = out.shape
    in_height, in_width = x.shape[1], x.shape[2]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * height * width * channels, stride):
        b, i, j, c = _unravel_nhwc(index, height, width, channels)
        out[b, i, j, c] = x[b, i, j, c] if i < in_height and j < in_width else _ZERO


def _top_left(x: Any, height: int, width: int) -> Any:
    with _LOCK:
        out = _empty((x.shape[0], height, width, x.shape[3]))
        _top_left_kernel[_blocks(out.size), _THREADS](x, out)
        return out


def pad_bottom_right(x: Any, height: int, width: int) -> Any:
    """Zero-pad ``(batch, h, w, channels)`` at the bottom and right to ``height x width``."""
    return _top_left(x, height, width)


def crop(x: Any, height: int, width: int) -> Any:
    """The top-left ``height x width`` of ``(batch, h, w, channels)``, contiguous."""
    return _top_left(x, height, width)


@cuda.jit
def _mean_pool_kernel(x, out):
    batch, positions, channels = x.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, batch * channels, stride):
        b = index // channels
        c = index % channels
        total = 0.0  # float64: thousands of positions summed once per image
        for p in range(positions):
            total += x[b, p, c]
        out[b, c] = total / positions


def mean_pool(x: Any) -> Any:
    """Average of ``(batch, height, width, channels)`` over the spatial axes -> ``(batch, channels)``."""
    with _LOCK:
        shape = tuple(x.shape)  # the simulator's shapes refuse negative indices
        batch, channels = shape[0], shape[-1]
        out = _empty((batch, channels))
        _mean_pool_kernel[_blocks(batch * channels), _THREADS](x.reshape(batch, -1, channels), out)
        return out


# ---------------------------------------------------------------------------------------------------
# LayerNorm: a group of lanes per row (a warp for wide rows), 256 threads per block, shared-memory sums
# ---------------------------------------------------------------------------------------------------
_LN_THREADS = 64 if SIMULATOR else 256  # (see _THREADS)
_layer_norm_kernels: dict[int, Any] = {}


def _layer_norm_kernel(lanes: int) -> Any:
    """LayerNorm with ``lanes`` threads per row (fewer for narrow rows, so that lanes are not left idle)."""
    compiled = _layer_norm_kernels.get(lanes)
    if compiled is not None:
        return compiled
    rows_per_block = _LN_THREADS // lanes

    @cuda.jit
    def kernel(x, weight, bias, eps, out):
        # Each lane adds up its share of the row; then every lane reads the row's partial sums itself
        # (broadcast reads), which needs fewer barriers than a tree reduction.
        partial = cuda.shared.array((rows_per_block, lanes), dtype=float32)
        rows, channels = x.shape
        lane = cuda.threadIdx.x % lanes
        slot = cuda.threadIdx.x // lanes
        # Block-uniform loop over groups of rows: the barriers inside are reached by every thread.
        for first in range(cuda.blockIdx.x * rows_per_block, rows, cuda.gridDim.x * rows_per_block):
            row = first + slot
            active = row < rows
            total = _ZERO
            if active:
                for c in range(lane, channels, lanes):
                    total += x[row, c]
            partial[slot, lane] = total
            cuda.syncthreads()
            total = _ZERO
            for other in range(lanes):
                total += partial[slot, other]
            mean = total / float32(channels)
            cuda.syncthreads()  # every lane has read the sums before the slots are reused

            total = _ZERO
            if active:
                for c in range(lane, channels, lanes):
                    centred = x[row, c] - mean
                    total += centred * centred
            partial[slot, lane] = total
            cuda.syncthreads()
            total = _ZERO
            for other in range(lanes):
                total += partial[slot, other]
            inverse = _ONE / math.sqrt(total / float32(channels) + eps)
            if active:
                for c in range(lane, channels, lanes):
                    out[row, c] = (x[row, c] - mean) * inverse * weight[c] + bias[c]
            cuda.syncthreads()  # the slots are reused by the next group of rows

    _layer_norm_kernels[lanes] = kernel
    return kernel


def _layer_norm_rows(rows: Any, weight: Any, bias: Any, eps: float) -> Any:
    """LayerNorm of each row of the 2-D ``rows`` into a new array (the caller holds ``_LOCK``)."""
    channels = rows.shape[1]
    out = _empty(rows.shape)
    lanes = 32 if channels >= 32 else 8
    blocks = _blocks(rows.shape[0], _LN_THREADS // lanes)
    _layer_norm_kernel(lanes)[blocks, _LN_THREADS](rows, weight, bias, np.float32(eps), out)
    return out


def layer_norm(x: Any, norm: Norm) -> Any:
    """LayerNorm over the last axis of ``x`` (any leading shape)."""
    with _LOCK:
        shape = tuple(x.shape)
        return _layer_norm_rows(x.reshape(-1, shape[-1]), norm.weight, norm.bias, norm.eps).reshape(*shape)


# ---------------------------------------------------------------------------------------------------
# Activations and epilogues
# ---------------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _activate(x, activation):
    if activation == 1:
        return _HALF * x * (_ONE + math.erf(x * _SQRT_HALF))
    if activation == 2:
        return _HALF * x * (_ONE + math.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)))
    if activation == 3:
        return max(x, _ZERO)
    if activation == 4:
        return _SELU_SCALE * (x if x > _ZERO else _SELU_ALPHA * (math.exp(x) - _ONE))
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
                accumulator[r, c] = _ZERO

        for k0 in range(0, depth, _TILE_K):
            for step in range(a_loads):
                element = thread + step * threads
                m = element // _TILE_K
                k = element % _TILE_K
                row = row0 + m
                kk = k0 + k
                a_tile[k, m] = a[row, kk] if row < rows and kk < depth else _ZERO
            for step in range(b_loads):
                element = thread + step * threads
                k = element // tile
                n = element % tile
                kk = k0 + k
                col = col0 + n
                b_tile[k, n] = b[kk, col] if kk < depth and col < columns else _ZERO
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
    """cuBLAS through CuPy when it is importable (and not disabled by ``DINAT_NP_USE_CUPY=0``)."""
    if SIMULATOR or os.environ.get("DINAT_NP_USE_CUPY", "1") == "0":
        return None
    try:
        import cupy
    except Exception:  # not installed, or installed without a matching CUDA runtime
        return None

    def gemm(a: Any, b: Any, out: Any) -> None:
        # Zero-copy views through __cuda_array_interface__; CuPy and numba both launch on the legacy
        # default stream, so the product is ordered between the numba kernels around it.
        cupy.matmul(cupy.asarray(a), cupy.asarray(b), out=cupy.asarray(out))

    return gemm


# ``(a, b, out) -> None`` writing ``a @ b`` into ``out``, or None for the built-in tiled kernel.
_external_gemm: Callable[[Any, Any, Any], None] | None = _cupy_gemm()


def _product(x2d: Any, weight_t: Any, bias: Any, mode: int, activation: int, scale: Any, residual: Any) -> Any:
    rows, depth = x2d.shape
    if weight_t.shape[0] != depth:
        raise ValueError(f"matrix product of {tuple(x2d.shape)} and {tuple(weight_t.shape)}: inner sizes differ")
    columns = weight_t.shape[1]
    out = _empty((rows, columns))
    has_bias = bias is not None
    bias = bias if has_bias else _placeholder(1)
    scale = scale if scale is not None else _placeholder(1)
    residual = residual if residual is not None else _placeholder(2)
    if _external_gemm is not None:
        _external_gemm(x2d, weight_t, out)
        if has_bias or mode != _EPILOGUE_ACTIVATION or activation != 0:
            _epilogue_kernel[_blocks(rows * columns), _THREADS](
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
    with _LOCK:
        shape = tuple(x.shape)
        y = _product(x.reshape(-1, shape[-1]), linear.weight, linear.bias, _EPILOGUE_ACTIVATION, code, None, None)
        return y.reshape(*(shape[:-1] + (y.shape[1],)))


def _residual_product(x: Any, linear: Linear, scale: Any, residual: Any) -> Any:
    """``residual + scale * linear(x)`` as ``(rows, out)``; the caller holds ``_LOCK``."""
    x2d = x.reshape(-1, tuple(x.shape)[-1])
    rows = residual.reshape(x2d.shape[0], linear.weight.shape[1])
    return _product(x2d, linear.weight, linear.bias, _EPILOGUE_RESIDUAL, 0, scale, rows)


def _closing(y: Any, shape: tuple[int, ...], norm: Norm | None) -> tuple[Any, Any]:
    """``(y, layer_norm(y) or None)``, both shaped ``shape``: here the LayerNorm is a kernel of its own."""
    normed = None if norm is None else _layer_norm_rows(y, norm.weight, norm.bias, norm.eps).reshape(*shape)
    return y.reshape(*shape), normed


def linear_residual(
    x: Any, linear: Linear, scale: Any, residual: Any, norm: Norm | None = None
) -> tuple[Any, Any]:
    """``out = residual + scale * linear(x)`` and ``layer_norm(out, norm)`` when given: ``(out, normed or None)``."""
    with _LOCK:
        return _closing(_residual_product(x, linear, scale, residual), tuple(residual.shape), norm)


def mlp_residual(
    x: Any, fc1: Linear, activation: str, fc2: Linear, scale: Any, residual: Any, norm: Norm | None = None
) -> tuple[Any, Any]:
    """``out = residual + scale * fc2(activation(fc1(x)))`` and ``layer_norm(out, norm)`` when given: the two
    products one after the other, each with its epilogue fused in."""
    with _LOCK:
        hidden = _product(x.reshape(-1, tuple(x.shape)[-1]), fc1.weight, fc1.bias, _EPILOGUE_ACTIVATION,
                          activation_code(activation), None, None)
        return _closing(_residual_product(hidden, fc2, scale, residual), tuple(residual.shape), norm)


# ---------------------------------------------------------------------------------------------------
# 3x3 stride-2 convolution: im2col kernel + the matrix product
# ---------------------------------------------------------------------------------------------------
@cuda.jit
def _im2col_kernel(x, cols):
    batch, height, width, channels = x.shape
    out_height = (height + 1) // 2
    out_width = (width + 1) // 2
    patch = 9 * channels
    total = batch * out_height * out_width * patch
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, total, stride):
        row = index // patch
        column = index % patch
        tap = column // channels
        c = column % channels
        oj = row % out_width
        rest = row // out_width
        oi = rest % out_height
        b = rest // out_height
        i = 2 * oi + tap // 3 - 1
        j = 2 * oj + tap % 3 - 1
        cols[row, column] = x[b, i, j, c] if 0 <= i < height and 0 <= j < width else _ZERO


def conv3x3_stride2(x: Any, conv: Conv) -> Any:
    """3x3 convolution, stride 2, zero padding 1, on channels-last ``x``; returns channels-last."""
    with _LOCK:
        batch, height, width, channels = x.shape
        out_height, out_width = (height + 1) // 2, (width + 1) // 2
        cols = _empty((batch * out_height * out_width, 9 * channels))
        _im2col_kernel[_blocks(cols.size), _THREADS](x, cols)
        y = _product(cols, conv.weight, conv.bias, _EPILOGUE_ACTIVATION, 0, None, None)
        return y.reshape(batch, out_height, out_width, y.shape[1])


# ---------------------------------------------------------------------------------------------------
# Neighborhood attention
# ---------------------------------------------------------------------------------------------------
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
        # the host made numba-cuda check their extents in a Python loop over every (pixel, head), which
        # took ~7 us per query on the H100 machine, 40 ms for one stage-1 layer.
        partials = cuda.shared.array((_WARPS_PER_BLOCK, _WARP, _PADDED_WARP), dtype=float32)
        probabilities = cuda.shared.array((_WARPS_PER_BLOCK, window), dtype=float32)
        batch, height, width, _, heads, head_dim = qkv.shape
        lane = cuda.threadIdx.x % _WARP
        slot = cuda.threadIdx.x // _WARP
        index = cuda.blockIdx.x * _WARPS_PER_BLOCK + slot
        valid = index < batch * height * width * heads  # no early return: every thread meets the barriers
        b, i, j, h = _unravel_nhwc(index if valid else 0, height, width, heads)
        key_row0 = row_start[i]
        key_col0 = col_start[j]

        for n0 in range(0, window, _WARP):
            if valid:
                for n in range(n0, min(n0 + _WARP, window)):
                    r = key_row0 + (n // K) * dilation
                    c = key_col0 + (n % K) * dilation
                    partial = _ZERO
                    for t in range(lane, head_dim, _WARP):
                        q = qkv[b, i, j, 0, h, t]
                        if has_bias:  # b_q (see cpu._na_fused for why b_k is dropped and b_v added at the end)
                            q += qkv_bias[h * head_dim + t]
                        partial += q * qkv[b, r, c, 1, h, t]
                    partials[slot, n - n0, lane] = partial
            cuda.syncthreads()
            n = n0 + lane
            if valid and n < window:
                dot = _ZERO
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
        total = _ZERO
        for n in range(window):
            total += probabilities[slot, n]
        inverse = _ONE / total
        if store_attn:
            for n in range(lane, window, _WARP):
                attn[b, h, i, j, n] = probabilities[slot, n] * inverse

        for t in range(lane, head_dim, _WARP):
            accumulator = _ZERO
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
    folded in as in ``cpu.neighborhood_attention``: the result is that of ``qkv + qkv_bias``. Returns
    the context ``(batch, height, width, heads, head_dim)`` and, when asked, the attention probabilities
    ``(batch, heads, height, width, kernel_size**2)`` (HF's layout).
    """
    kernel_size, dilation = int(kernel_size), int(dilation)
    batch, height, width, _, heads, head_dim = qkv.shape
    check_window(height, width, kernel_size, dilation)
    if kernel_size > _MAX_KERNEL_SIZE:
        raise ValueError(
            f"kernel_size {kernel_size} is too large for the CUDA neighborhood attention kernel (at most "
            f"{_MAX_KERNEL_SIZE}: a block's probabilities must fit in 48 KiB of shared memory); use device='cpu'"
        )
    has_bias = qkv_bias is not None
    if has_bias:
        check_qkv_bias(qkv_bias.shape, heads, head_dim)
    with _LOCK:
        qkv_bias = qkv_bias if has_bias else _placeholder(1)
        row_start, row_bias = _window_tables(height, kernel_size, dilation)
        col_start, col_bias = _window_tables(width, kernel_size, dilation)
        out = _empty((batch, height, width, heads, head_dim))
        attn = _empty((batch, heads, height, width, kernel_size**2)) if return_attention else _placeholder(5)
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
        dot = _ZERO
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
        accumulator = _ZERO
        for ki in range(kernel_size):
            r = row_start[i] + ki * dilation
            for kj in range(kernel_size):
                accumulator += attn[b, h, i, j, ki * kernel_size + kj] * value[b, r, col_start[j] + kj * dilation, h, t]
        out[b, i, j, h, t] = accumulator


def na_qk(query: Any, key: Any, rpb: Any, kernel_size: int, dilation: int) -> Any:
    """Unfused ``q.k + rpb``: ``(batch, heads, height, width, kernel_size**2)`` from channels-last q and k."""
    kernel_size, dilation = int(kernel_size), int(dilation)
    check_window(query.shape[1], query.shape[2], kernel_size, dilation)
    with _LOCK:
        batch, height, width, heads, _ = query.shape
        row_start, row_bias = _window_tables(height, kernel_size, dilation)
        col_start, col_bias = _window_tables(width, kernel_size, dilation)
        logits = _empty((batch, heads, height, width, kernel_size * kernel_size))
        _na_qk_kernel[_blocks(logits.size), _THREADS](
            query, key, rpb, row_start, row_bias, col_start, col_bias, kernel_size, dilation, logits
        )
        return logits


def na_av(attn: Any, value: Any, kernel_size: int, dilation: int) -> Any:
    """Unfused ``attn @ v`` with ``attn`` in HF layout and ``value`` channels-last; result channels-last."""
    kernel_size, dilation = int(kernel_size), int(dilation)
    check_window(value.shape[1], value.shape[2], kernel_size, dilation)
    with _LOCK:
        height, width = value.shape[1], value.shape[2]
        row_start, _ = _window_tables(height, kernel_size, dilation)
        col_start, _ = _window_tables(width, kernel_size, dilation)
        out = _empty(value.shape)
        _na_av_kernel[_blocks(out.size), _THREADS](attn, value, row_start, col_start, kernel_size, dilation, out)
        return out
