"""What both backends share: parameter groups, window geometry, activations, weight layouts, epilogues.

Nothing here runs on a device or changes the process: the CPU and CUDA backends both import this
module, and neither imports the other.
"""

from __future__ import annotations

import enum
import numbers
from typing import Any, NamedTuple

import numpy as np


# ---------------------------------------------------------------------------------------------------
# Parameter groups: what travels together from the model to an op
# ---------------------------------------------------------------------------------------------------
class Linear(NamedTuple):
    """A linear layer in the backend's layout: ``weight`` is ``(in_features, out_features)`` (see
    :func:`linear_weight_layout`; the CPU backend's own product reads it packed, still of that ``shape``),
    ``bias`` is ``(out_features,)`` or None."""

    weight: Any
    bias: Any = None


class Conv(NamedTuple):
    """A ``k x k`` convolution in the backend's layout: ``weight`` is ``(k * k * in_channels, out_channels)``
    (see :func:`conv_weight_layout`), ``bias`` is ``(out_channels,)`` or None."""

    weight: Any
    bias: Any = None


class Norm(NamedTuple):
    """A LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

    weight: Any
    bias: Any
    eps: float


# ---------------------------------------------------------------------------------------------------
# Activations (HF ``hidden_act`` names) and the number each kernel knows them by
# ---------------------------------------------------------------------------------------------------
ACTIVATIONS = {"identity": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "relu": 3, "selu": 4}
IDENTITY, GELU, GELU_TANH, RELU, SELU = 0, 1, 2, 3, 4


def activation_code(activation: str) -> int:
    """The kernels' number for ``activation``; a clear error for any other name."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


# ---------------------------------------------------------------------------------------------------
# What a matrix product does to its result before storing it (one numbering for every kernel)
# ---------------------------------------------------------------------------------------------------
class Epilogue(enum.IntEnum):
    NONE = 0  # y = x @ w
    ACTIVATION = 1  # y = activation(x @ w + bias)
    RESIDUAL = 2  # y = residual + scale * (x @ w + bias)
    RESIDUAL_NORM = 3  # RESIDUAL, and LayerNorm(y) written beside it


# ---------------------------------------------------------------------------------------------------
# Weight layouts: PyTorch's tensors -> what the kernels read (the backends upload these)
# ---------------------------------------------------------------------------------------------------
def linear_weight_layout(weight: np.ndarray) -> np.ndarray:
    """``(out, in)`` PyTorch weight -> contiguous float32 ``(in, out)``, so that a product is ``x @ weight``."""
    return np.ascontiguousarray(np.asarray(weight, np.float32).T)


def conv_weight_layout(weight: np.ndarray) -> np.ndarray:
    """``(out, in, k, k)`` PyTorch weight -> ``(k * k * in, out)``, rows in im2col (row, column, channel) order."""
    out_channels = weight.shape[0]
    return np.ascontiguousarray(np.asarray(weight, np.float32).transpose(2, 3, 1, 0).reshape(-1, out_channels))


# ---------------------------------------------------------------------------------------------------
# Neighborhood geometry (NATTEN's rule) and the checks every backend runs before launching
# ---------------------------------------------------------------------------------------------------
def window_starts(length: int, kernel_size: int, dilation: int) -> tuple[np.ndarray, np.ndarray]:
    """First key position and first relative-position-bias index of each query along one axis.

    Dilated NA is plain NA on each of the ``dilation`` interleaved sub-grids of the axis: in a sub-grid
    of ``group_length`` positions the window starts at ``clamp(i - kernel_size // 2, 0,
    group_length - kernel_size)``, so it is shifted inward at the borders instead of being padded. The
    bias index is the key's offset from the query in sub-grid units, shifted by ``kernel_size - 1``.
    Plain Python, so that both backends use this one copy: the CPU backend compiles it with Numba.
    """
    window_start = np.empty(length, np.int64)
    bias_start = np.empty(length, np.int64)
    for position in range(length):
        group = position % dilation
        index_in_group = position // dilation
        group_length = (length - group + dilation - 1) // dilation
        start = min(max(index_in_group - kernel_size // 2, 0), group_length - kernel_size)
        window_start[position] = start * dilation + group
        bias_start[position] = start - index_in_group + kernel_size - 1
    return window_start, bias_start


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_window(height: int, width: int, kernel_size: int, dilation: int) -> None:
    """Refuse a neighborhood that does not fit the feature map: the kernels would read outside it."""
    if not _is_integer(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if not _is_integer(dilation) or dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")
    if height < kernel_size * dilation or width < kernel_size * dilation:
        raise ValueError(
            f"feature map {height}x{width} is smaller than kernel_size * dilation = "
            f"{kernel_size} * {dilation} = {kernel_size * dilation}; pad the input first"
        )


def check_qkv_bias(shape: tuple[int, ...], heads: int, head_dim: int) -> None:
    """Refuse a q/k/v bias that is not the three biases side by side, ``(3 * heads * head_dim,)``."""
    expected = (3 * heads * head_dim,)
    if tuple(shape) != expected:
        raise ValueError(f"qkv_bias must have shape {expected} (3 * heads * head_dim), got {tuple(shape)}")


def check_patch_size(patch_size: int) -> None:
    """Refuse a patch size that is not an integer >= 1."""
    if not _is_integer(patch_size) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")


def check_global_grid(height: int, width: int, rpb_shape: tuple[int, ...]) -> int:
    """The side ``L`` of a square map whose relative position bias table ``(heads, 2L-1, 2L-1)`` is ``rpb``'s;
    a clear error for a map that is not square or not the one the table was made for."""
    span = rpb_shape[-1]
    if height != width or len(rpb_shape) != 3 or rpb_shape[1] != span or 2 * height - 1 != span:
        raise ValueError(
            f"global attention with a relative position bias table of shape {tuple(rpb_shape)} needs a square "
            f"map of {(span + 1) // 2}x{(span + 1) // 2} positions, got {height}x{width}"
        )
    return height

