"""Compute backends. Each module offers the same ops with the same signatures:

``upload``, ``download``, ``linear_weight``, ``conv_weight``, ``layer_norm``, ``linear``,
``linear_residual``, ``conv3x3_stride2``, ``neighborhood_attention``, ``na_qk``, ``na_av``,
``pad_bottom_right``, ``crop``, ``mean_pool``, ``nchw_to_nhwc``.
The model only orchestrates these; it never touches backend arrays directly.
"""

from __future__ import annotations

from types import ModuleType

DEVICES = ("cpu", "cuda")


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
