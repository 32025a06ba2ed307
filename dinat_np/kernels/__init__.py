"""Compute backends. Each module offers the same ops with the same signatures:

``upload``, ``download``, ``linear_weight``, ``conv_weight``, ``layer_norm``, ``linear``,
``linear_residual_norm``, ``mlp_residual``, ``mlp_residual_norm``, ``conv3x3_stride2``,
``neighborhood_attention``, ``na_qk``, ``na_av``, ``pad_bottom_right``, ``crop``, ``mean_pool``,
``nchw_to_nhwc``.
The model only orchestrates these; it never touches backend arrays directly.
"""

from __future__ import annotations

import numbers
from types import ModuleType

DEVICES = ("cpu", "cuda")


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


def get_backend(device: str) -> ModuleType:
    """The backend module for ``device`` ("cpu" or "cuda"); a clear error if it cannot run here."""
    if device == "cpu":
        from . import cpu

        return cpu
    if device == "cuda":
        try:
            from . import cuda
        except ImportError as error:
            raise RuntimeError(
                f"device='cuda' needs numba-cuda: pip install 'dinat-np[gpu]' ({error})"
            ) from None
        cuda.require_gpu()
        return cuda
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
