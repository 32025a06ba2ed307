"""CUDA backend: numba.cuda kernels for every op of the forward pass (the contract of ``kernels.backend``).

Backend arrays are numba device arrays. ``upload`` copies a host array to the GPU once (the model uploads
its weights when it is built, so they stay on the device); ``download`` returns a NumPy array. Layouts are
the contract's: channels-last activations, q/k/v as ``(batch, height, width, heads, head_dim)``, linear
weights ``(in_features, out_features)``, ``k x k`` convolution weights ``(k * k * in_channels, out_channels)``
in im2col (row, column, channel) order.

One module per op family:
- ``attention``: dilated neighborhood attention with relative position bias, fused (one warp per query)
  and unfused (``na_qk``, ``na_av``), and ViT-rpb's global attention on the fused kernel;
- ``products``: the tiled matrix product with its epilogues fused in (bias + activation, or
  ``residual + layer_scale * (y + bias)``), cuBLAS through CuPy when CuPy is importable;
- ``conv``: the 3x3 stride-2 convolution and the patch embedding (im2col kernels + the product);
- ``norm``: LayerNorm;
- ``layout``: data movement, weight layouts, pad/crop/patch-merging/mean-pool/NCHW->NHWC kernels;
- ``device``: what they all use: the GPU check, the lock every op holds while it launches, allocation,
  launch sizes.

Nothing here imports the CPU backend: what both share comes from ``kernels.common``.
"""

from .attention import global_attention, na_av, na_qk, neighborhood_attention
from .conv import conv3x3_stride2, patch_embedding
from .device import require_gpu
from .layout import (conv_weight, crop, download, linear_weight, mean_pool, nchw_to_nhwc, pad_bottom_right,
                     patch_merging, upload)
from .norm import layer_norm
from .products import linear, linear_residual, mlp_residual

__all__ = [
    "require_gpu", "upload", "download", "linear_weight", "conv_weight", "nchw_to_nhwc", "layer_norm", "linear",
    "linear_residual", "mlp_residual", "conv3x3_stride2", "patch_embedding", "neighborhood_attention",
    "global_attention", "na_qk", "na_av", "pad_bottom_right", "crop", "patch_merging", "mean_pool",
]
