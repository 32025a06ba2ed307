"""Torch-free 2-D neighborhood attention ops with NATTEN's semantics and layout.

Tensors are ``(batch, heads, height, width, head_dim)`` as in NATTEN; attention weights are
``(batch, heads, height, width, kernel_size**2)`` with the last axis walking the window row-major
(key row outer, key column inner). Each query attends to ``kernel_size x kernel_size`` keys taken every
``dilation`` pixels around it; near the borders the window is shifted inward, never padded, so every
query sees exactly ``kernel_size**2`` real keys. That requires ``height`` and ``width`` to be at least
``kernel_size * dilation``; the models pad smaller feature maps themselves, as Hugging Face does.
"""

from __future__ import annotations

import numpy as np

from .kernels import check_window, get_backend

__all__ = ["na2d_qk", "na2d_av", "na2d"]


def _as_tensor(name: str, array: np.ndarray, like: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 5:
        raise ValueError(f"{name} must be 5-D (batch, heads, height, width, head_dim), got shape {array.shape}")
    if like is not None and array.shape != like:
        raise ValueError(f"{name} has shape {array.shape}, expected {like}")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got {array.dtype}")
    return array


def _channels_last(array: np.ndarray) -> np.ndarray:
    """(batch, heads, height, width, dim) -> contiguous float32 (batch, height, width, heads, dim)."""
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1, 4), dtype=np.float32)


def _bias(rpb: np.ndarray | None, heads: int, kernel_size: int) -> np.ndarray:
    span = 2 * kernel_size - 1
    if rpb is None:
        return np.zeros((heads, span, span), np.float32)
    rpb = np.asarray(rpb)
    if rpb.shape != (heads, span, span):
        raise ValueError(f"rpb has shape {rpb.shape}, expected (heads, 2k-1, 2k-1) = {(heads, span, span)}")
    return np.ascontiguousarray(rpb, dtype=np.float32)


def na2d_qk(
    query: np.ndarray, key: np.ndarray, kernel_size: int, dilation: int = 1, rpb: np.ndarray | None = None
) -> np.ndarray:
    """Attention logits ``q . k (+ rpb)`` of every query with its neighborhood; no scaling applied.

    Returns float32 ``(batch, heads, height, width, kernel_size**2)``.
    """
    query = _as_tensor("query", query)
    key = _as_tensor("key", key, query.shape)
    check_window(query.shape[2], query.shape[3], kernel_size, dilation)
    bias = _bias(rpb, query.shape[1], kernel_size)
    return get_backend("cpu").na_qk(_channels_last(query), _channels_last(key), bias, kernel_size, dilation)


def na2d_av(attn: np.ndarray, value: np.ndarray, kernel_size: int, dilation: int = 1) -> np.ndarray:
    """Weighted sum of each query's neighborhood values; ``attn`` as returned by :func:`na2d_qk`.

    Returns float32 ``(batch, heads, height, width, head_dim)``.
    """
    value = _as_tensor("value", value)
    check_window(value.shape[2], value.shape[3], kernel_size, dilation)
    attn = np.asarray(attn)
    expected = value.shape[:4] + (kernel_size * kernel_size,)
    if attn.shape != expected:
        raise ValueError(f"attn has shape {attn.shape}, expected {expected}")
    out = get_backend("cpu").na_av(
        np.ascontiguousarray(attn, dtype=np.float32), _channels_last(value), int(kernel_size), int(dilation)
    )
    return out.transpose(0, 3, 1, 2, 4)


def na2d(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    kernel_size: int,
    dilation: int = 1,
    rpb: np.ndarray | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """Fused neighborhood attention ``softmax(scale * q.k + rpb) @ v``, no attention matrix in memory.

    ``scale`` defaults to ``head_dim ** -0.5``. Returns float32 ``(batch, heads, height, width, head_dim)``.
    """
    query = _as_tensor("query", query)
    key = _as_tensor("key", key, query.shape)
    value = _as_tensor("value", value, query.shape)
    check_window(query.shape[2], query.shape[3], kernel_size, dilation)
    bias = _bias(rpb, query.shape[1], kernel_size)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    qkv = np.stack([_channels_last(query), _channels_last(key), _channels_last(value)], axis=3)
    out, _ = get_backend("cpu").neighborhood_attention(qkv, bias, int(kernel_size), int(dilation), float(scale))
    return out.transpose(0, 3, 1, 2, 4)
