"""A small PyTorch reference of NATTEN's 2-D (dilated) neighborhood attention.

Test/dev helper only (imports torch); the ``dinat_np`` package never imports it.

Written from NATTEN's documented semantics, not from its code:

* every query pixel attends to ``kernel_size x kernel_size`` keys taken every ``dilation``
  pixels; near the borders the window is shifted inward (never zero-padded), so every query
  always sees exactly ``kernel_size**2`` real keys;
* dilated NA equals plain NA run separately on each of the ``dilation x dilation`` sub-grids of
  pixels sharing ``(row % dilation, col % dilation)``.  In a sub-grid of length ``Lg`` the
  window of sub-grid position ``i_g`` starts at ``clamp(i_g - k // 2, 0, Lg - k)``;
* the relative position bias ``rpb`` has shape ``(heads, 2k-1, 2k-1)`` and is indexed per axis
  by ``(key_g - query_g) + k - 1`` (offsets counted in sub-grid steps).

Layout follows NATTEN's unfused ops: ``(batch, heads, height, width, head_dim)``; attention
weights are ``(batch, heads, height, width, kernel_size**2)`` with the last axis walking the
window row-major (key row outer, key column inner).

The ops are plain gathers + einsums, so autograd works and they are fast enough to train the
small demo model.  ``patch_transformers()`` plugs them into transformers 4.53.3's DiNAT and NAT
models in place of NATTEN.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["neighborhood_indices", "na2d_qk", "na2d_av", "patch_transformers"]


@functools.lru_cache(maxsize=256)
def neighborhood_indices(length: int, kernel_size: int, dilation: int) -> tuple[np.ndarray, np.ndarray]:
    """Key positions and rpb positions of every query along one axis.

    Args:
        length: axis length (height or width).
        kernel_size: odd window size.
        dilation: step between the keys of one window.

    Returns:
        ``(keys, bias)``, both int64 arrays of shape ``(length, kernel_size)``: ``keys[i, j]`` is
        the position of the j-th key of query ``i``; ``bias[i, j]`` indexes the rpb axis.

    Raises:
        ValueError: on an even / non-positive kernel, a non-positive dilation, or
            ``length < kernel_size * dilation`` (NATTEN's requirement; the models pad first).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1, got {dilation}")
    if length < kernel_size * dilation:
        raise ValueError(
            f"input size {length} is smaller than kernel_size * dilation = "
            f"{kernel_size} * {dilation} = {kernel_size * dilation}"
        )
    i = np.arange(length)
    group = i % dilation  # which sub-grid the query belongs to
    i_g = i // dilation  # its position inside that sub-grid
    group_len = (length - group + dilation - 1) // dilation  # ceil((length - group) / dilation)
    start_g = np.clip(i_g - kernel_size // 2, 0, group_len - kernel_size)
    j = np.arange(kernel_size)
    key_g = start_g[:, None] + j[None, :]
    keys = key_g * dilation + group[:, None]
    bias = key_g - i_g[:, None] + kernel_size - 1
    return keys.astype(np.int64), bias.astype(np.int64)


def _check_5d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 5:
        raise ValueError(f"{name} must be 5-D (batch, heads, height, width, dim), got shape {tuple(t.shape)}")


def _gather_neighborhoods(x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(B, h, H, W, D) -> (B, h, H, W, k, k, D): the k*k neighbors of each query pixel."""
    height, width = x.shape[2], x.shape[3]
    rows, _ = neighborhood_indices(height, kernel_size, dilation)
    cols, _ = neighborhood_indices(width, kernel_size, dilation)
    rows_t = torch.from_numpy(rows).to(x.device)
    cols_t = torch.from_numpy(cols).to(x.device)
    # Two broadcast index tensors on adjacent axes -> result axes (H, W, k, k) in their place.
    return x[:, :, rows_t[:, None, :, None], cols_t[None, :, None, :], :]


def na2d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
) -> torch.Tensor:
    """Neighborhood attention logits ``q . k`` (+ rpb), no scaling applied.

    Args:
        query, key: ``(batch, heads, height, width, head_dim)``.
        kernel_size: odd window size.
        dilation: key step.
        rpb: optional relative position bias ``(heads, 2k-1, 2k-1)``.

    Returns:
        ``(batch, heads, height, width, kernel_size**2)``, window row-major.
    """
    _check_5d("query", query)
    _check_5d("key", key)
    if query.shape != key.shape:
        raise ValueError(f"query and key shapes differ: {tuple(query.shape)} vs {tuple(key.shape)}")
    batch, heads, height, width, _ = query.shape
    neighbors = _gather_neighborhoods(key, kernel_size, dilation)
    logits = torch.einsum("bnhwd,bnhwijd->bnhwij", query, neighbors)
    if rpb is not None:
        expected = (heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
        if tuple(rpb.shape) != expected:
            raise ValueError(f"rpb must have shape {expected}, got {tuple(rpb.shape)}")
        _, bias_rows = neighborhood_indices(height, kernel_size, dilation)
        _, bias_cols = neighborhood_indices(width, kernel_size, dilation)
        br = torch.from_numpy(bias_rows).to(rpb.device)
        bc = torch.from_numpy(bias_cols).to(rpb.device)
        logits = logits + rpb[:, br[:, None, :, None], bc[None, :, None, :]]  # (heads, H, W, k, k)
    return logits.reshape(batch, heads, height, width, kernel_size * kernel_size)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """Weighted sum of the neighborhood values.

    Args:
        attn: ``(batch, heads, height, width, kernel_size**2)`` weights, window row-major.
        value: ``(batch, heads, height, width, head_dim)``.
        kernel_size: odd window size.
        dilation: key step.

    Returns:
        ``(batch, heads, height, width, head_dim)``.
    """
    _check_5d("attn", attn)
    _check_5d("value", value)
    batch, heads, height, width, _ = value.shape
    expected = (batch, heads, height, width, kernel_size * kernel_size)
    if tuple(attn.shape) != expected:
        raise ValueError(f"attn must have shape {expected}, got {tuple(attn.shape)}")
    neighbors = _gather_neighborhoods(value, kernel_size, dilation)
    weights = attn.reshape(batch, heads, height, width, kernel_size, kernel_size)
    return torch.einsum("bnhwij,bnhwijd->bnhwd", weights, neighbors)


# --------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------


def _natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    # NATTEN's legacy signature, as called by transformers' DiNAT / NAT.
    return na2d_qk(query, key, kernel_size, dilation, rpb=rpb)


def _natten2dav(attn, value, kernel_size, dilation):
    return na2d_av(attn, value, kernel_size, dilation)


def _natten_available() -> bool:
    return True


class patch_transformers:  # noqa: N801 - used like a function / context manager
    """Make transformers' DiNAT (and NAT) models run on this reference instead of NATTEN.

    Calling ``patch_transformers()`` applies the patch at once (so a bare call patches for the
    rest of the process); used as ``with patch_transformers(): ...`` it is undone on exit.

    Replaced: the module-level ``natten2dqkrpb`` / ``natten2dav`` of
    ``transformers.models.dinat.modeling_dinat`` and of NAT's ``modeling_nat`` (NAT passes
    dilation 1 itself), and the ``"natten"`` backend check: ``requires_backends`` looks the
    backend up in ``transformers.utils.import_utils.BACKENDS_MAPPING``, which holds its own
    reference to ``is_natten_available``, so that mapping entry is what gets replaced.
    """

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []
        self._saved_mapping = None
        self._apply()

    def _set(self, obj: object, name: str, value: object) -> None:
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def _apply(self) -> None:
        from transformers.utils import import_utils
        from transformers.models.dinat import modeling_dinat

        modules = [modeling_dinat]
        try:  # NAT moved to models/deprecated in 4.4x
            from transformers.models.deprecated.nat import modeling_nat
        except ImportError:  # pragma: no cover - other transformers layouts
            try:
                from transformers.models.nat import modeling_nat
            except ImportError:
                modeling_nat = None
        if modeling_nat is not None:
            modules.append(modeling_nat)

        for module in modules:
            self._set(module, "natten2dqkrpb", _natten2dqkrpb)
            self._set(module, "natten2dav", _natten2dav)
            if hasattr(module, "is_natten_available"):
                self._set(module, "is_natten_available", _natten_available)
        self._set(import_utils, "is_natten_available", _natten_available)
        mapping = import_utils.BACKENDS_MAPPING
        self._saved_mapping = mapping["natten"]
        mapping["natten"] = (_natten_available, self._saved_mapping[1])

    def undo(self) -> None:
        """Restore everything the patch replaced (idempotent)."""
        from transformers.utils import import_utils

        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        self._saved.clear()
        if self._saved_mapping is not None:
            import_utils.BACKENDS_MAPPING["natten"] = self._saved_mapping
            self._saved_mapping = None

    def __enter__(self) -> patch_transformers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()
