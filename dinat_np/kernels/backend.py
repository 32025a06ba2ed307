"""The contract between the models and the compute backends: every op, typed and documented once.

The models only orchestrate these ops and never touch a backend's arrays themselves. Each backend
(``dinat_np.kernels.cpu``, ``dinat_np.kernels.cuda``) is a package whose top level offers exactly these
functions with these signatures; ``tests/test_backend_contract.py`` checks that both do.

Layouts, the same on every backend:
- activations are channels-last: ``(rows, channels)`` or ``(batch, height, width, channels)``;
- queries, keys and values are ``(batch, height, width, heads, head_dim)``;
- linear and convolution weights are in the layouts of :mod:`dinat_np.kernels.common`
  (``Linear``, ``Conv``); LayerNorm parameters travel as ``Norm``.

An ``Array`` is a NumPy array on the CPU and a numba device array on CUDA; ``download`` turns either
into NumPy.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .common import Conv, Linear, Norm

Array = Any

DEVICES = ("cpu", "cuda")


@runtime_checkable
class Backend(Protocol):
    # -- data movement and weight layouts -------------------------------------------------------------
    def upload(self, array: np.ndarray) -> Array:
        """A float32 copy of a host array on the backend (the model keeps no view of a mapped file)."""

    def download(self, array: Array) -> np.ndarray:
        """The host NumPy array of a backend array (of a weight: its ``(in, out)`` matrix)."""

    def linear_weight(self, weight: np.ndarray) -> Array:
        """``(out, in)`` PyTorch weight -> the backend's ``(in, out)`` layout: an array of that shape, or an
        object with that ``shape`` that the backend's products read faster (the CPU's packed weights)."""

    def conv_weight(self, weight: np.ndarray) -> Array:
        """``(out, in, k, k)`` PyTorch weight -> the backend's ``(k * k * in, out)`` im2col layout (rows in
        (row, column, channel) order; packed as ``linear_weight``'s may be): the 3x3 convolution's, and the
        patch embedding's with k the patch size."""

    def nchw_to_nhwc(self, x: np.ndarray) -> Array:
        """Pixel values ``(batch, channels, height, width)`` -> channels-last float32 on the backend."""

    # -- norms and products ---------------------------------------------------------------------------
    def layer_norm(self, x: Array, norm: Norm) -> Array:
        """LayerNorm over the last axis of ``x``."""

    def linear(self, x: Array, linear: Linear, activation: str = "identity") -> Array:
        """``activation(x @ linear.weight + linear.bias)`` over the last axis of ``x``."""

    def linear_residual(
        self, x: Array, linear: Linear, scale: Array, residual: Array, norm: Norm | None = None
    ) -> tuple[Array, Array | None]:
        """A projection closing a residual branch: ``out = residual + scale * linear(x)`` (``scale``: the
        layer scale, one value per channel), and ``layer_norm(out, norm)`` when ``norm`` is given (the
        LayerNorm that reads the new residual stream; a backend may compute it in the same pass).
        Returns ``(out, normed or None)``, both shaped like ``residual``."""

    def mlp_residual(
        self, x: Array, fc1: Linear, activation: str, fc2: Linear, scale: Array, residual: Array,
        norm: Norm | None = None,
    ) -> tuple[Array, Array | None]:
        """A transformer MLP closing its residual branch: ``out = residual + scale * fc2(activation(fc1(x)))``,
        and ``layer_norm(out, norm)`` when ``norm`` is given. Returns ``(out, normed or None)``."""

    def conv3x3_stride2(self, x: Array, conv: Conv) -> Array:
        """3x3 convolution, stride 2, zero padding 1, on channels-last ``x``; channels-last result."""

    def patch_embedding(self, x: Array, conv: Conv, patch_size: int) -> Array:
        """Non-overlapping patches: a ``patch_size x patch_size`` convolution with stride ``patch_size`` on
        channels-last ``x`` ``(batch, h, w, in)``, which is first zero-padded at the bottom and right to a
        multiple of ``patch_size``; ``conv.weight`` is ``(patch_size**2 * in, out)`` (see ``conv_weight``).
        Channels-last result ``(batch, ceil(h / patch_size), ceil(w / patch_size), out)``."""

    # -- neighborhood attention -----------------------------------------------------------------------
    def neighborhood_attention(
        self, qkv: Array, rpb: Array, kernel_size: int, dilation: int, scale: float,
        return_attention: bool = False, qkv_bias: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """Fused ``softmax(scale * q.k + rpb) @ v`` over each query's dilated ``kernel_size**2`` window.

        ``qkv`` is ``(batch, height, width, 3, heads, head_dim)`` (one product of the input);
        ``qkv_bias`` ``(3 * heads * head_dim,)`` is that product's bias, applied here. Returns the context
        ``(batch, height, width, heads, head_dim)`` and, when asked, the attention probabilities
        ``(batch, heads, height, width, kernel_size**2)`` (HF's layout)."""

    def global_attention(
        self, qkv: Array, rpb: Array, scale: float, return_attention: bool = False, qkv_bias: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """Self-attention over every position of a square ``L x L`` map with ViT-rpb's relative position
        bias: ``softmax(scale * q.k + bias) @ v``, where query ``(r, c)`` and key ``(r', c')`` get
        ``rpb[h, r' - r + L - 1, c' - c + L - 1]`` (``rpb`` is ``(heads, 2L-1, 2L-1)``).

        ``qkv`` and ``qkv_bias`` are as for ``neighborhood_attention``. Returns the context ``(batch, L, L,
        heads, head_dim)`` and, when asked, the probabilities ``(batch, heads, L * L, L * L)`` (queries and
        keys row-major). This is neighborhood attention whose window is the whole map: a window of ``L``
        keys on an axis of ``L`` starts at 0 for every query, and NATTEN's bias index is key minus query."""

    def na_qk(self, query: Array, key: Array, rpb: Array, kernel_size: int, dilation: int) -> Array:
        """Unfused logits ``q.k + rpb``: ``(batch, heads, height, width, kernel_size**2)`` from
        channels-last ``query`` and ``key``; no scaling."""

    def na_av(self, attn: Array, value: Array, kernel_size: int, dilation: int) -> Array:
        """Unfused ``attn @ v`` with ``attn`` in HF layout and ``value`` channels-last; channels-last result."""

    # -- layout ----------------------------------------------------------------------------------------
    def pad_bottom_right(self, x: Array, height: int, width: int) -> Array:
        """Zero-pad ``(batch, h, w, channels)`` at the bottom and right to ``height x width``."""

    def crop(self, x: Array, height: int, width: int) -> Array:
        """The top-left ``height x width`` of ``(batch, h, w, channels)``."""

    def patch_merging(self, x: Array) -> Array:
        """Each 2x2 block of ``(batch, h, w, c)`` as one position of ``4 * c`` channels: its neighbours at
        (row, column) offsets (0,0), (1,0), (0,1), (1,1) side by side, in that order (Swin's), after
        zero-padding an odd ``h`` or ``w`` at the bottom or right. Result ``(batch, ceil(h/2), ceil(w/2), 4c)``."""

    def mean_pool(self, x: Array) -> Array:
        """Average of ``(batch, height, width, channels)`` over the spatial axes: ``(batch, channels)``."""


def get_backend(device: str) -> Backend:
    """The backend for ``device`` ("cpu" or "cuda"), set up on first use; a clear error if it cannot run here."""
    if device == "cpu":
        from . import cpu

        cpu.set_up_process()
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
