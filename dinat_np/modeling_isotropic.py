"""The DiNAT paper's isotropic models: NAT / DiNAT isotropic and their baseline ViT-rpb.

One resolution throughout: an image is cut into 16x16 patches (a 16x16 stride-16 convolution, the image
zero-padded to a multiple of 16, then LayerNorm), one stack of DiNAT's transformer layers runs on the
14x14 tokens of a 224x224 image, and LayerNorm, average pooling and a linear head finish. NAT / DiNAT
isotropic layers use neighborhood attention (layer ``i`` with dilation 1 when ``i`` is even, the model's
dilation otherwise); ViT-rpb's use global self-attention with a relative position bias table made for
the ``image_size // patch_size`` token grid, which therefore fixes the input size. Weights are named as
DiNAT's, under ``nat_isotropic.`` (the layers ``nat_isotropic.encoder.layers.<i>.``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .configuration_family import NatIsotropicConfig
from .kernels import Linear
from .kernels.backend import Array
from .modeling import DinatForImageClassification, DinatLayer, DinatModel, DinatModelOutput, DinatStage
from .modeling_utils import LayerNorm, PatchEmbeddings, Weights

__all__ = [
    "GlobalSelfAttention", "NatIsotropicForImageClassification", "NatIsotropicModel", "VitRpbEncoder",
    "VitRpbLayer",
]


class GlobalSelfAttention:
    """ViT-rpb's multi-head self-attention over all tokens, with a relative position bias table ``rpb``
    ``(heads, 2L-1, 2L-1)`` for the ``L x L`` token grid, read at each key's offset from the query."""

    def __init__(
        self, weights: Weights, name: str, config: NatIsotropicConfig, *, dim: int, num_heads: int,
        dilation: None = None,
    ) -> None:
        # ``dilation``: none; the argument is there because DinatLayer builds its attention with one.
        self.ops = weights.backend
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        roles = [f"{name}.{role}" for role in ("query", "key", "value")]
        qkv = weights.linears_side_by_side(roles, dim, dim, bias=config.qkv_bias)
        self.qkv, self.qkv_bias = Linear(qkv.weight), qkv.bias  # the kernel adds the bias as it reads q/k/v
        span = 2 * config.grid_size - 1  # relative offsets -(L-1)..(L-1) along each axis
        self.rpb = weights.tensor(f"{name}.rpb", (num_heads, span, span), init=0.0)

    def __call__(self, x: Array, output_attentions: bool) -> tuple[Array, Array | None]:
        """Context ``(batch, L, L, dim)`` before the output projection, and the attention probabilities
        ``(batch, heads, L * L, L * L)`` when asked."""
        batch, height, width, _ = x.shape
        qkv = self.ops.linear(x, self.qkv).reshape(batch, height, width, 3, self.num_heads, self.head_dim)
        context, attention = self.ops.global_attention(
            qkv, self.rpb, self.head_dim**-0.5, return_attention=output_attentions, qkv_bias=self.qkv_bias,
        )
        return context.reshape(batch, height, width, -1), attention


class VitRpbLayer(DinatLayer):
    """ViT-rpb's layer: DiNAT's pre-norm layer with global attention in place of neighborhood attention."""

    attention_class = GlobalSelfAttention


class VitRpbEncoder(DinatStage):
    """ViT-rpb's layers, at one resolution."""

    layer_class = VitRpbLayer


class NatIsotropicModel(DinatModel):
    """The bare isotropic encoder: final LayerNorm'd token map and (optionally) its average; outputs as
    ``DinatModel``'s, the encoder being one stage (``hidden_states``: the embeddings and the last layer's
    output; ``attentions``: the last layer's)."""

    config_class = NatIsotropicConfig

    def _build(self, weights: Weights, prefix: str) -> None:
        config = self.config
        self.embeddings = PatchEmbeddings(weights, f"{prefix}embeddings", config)
        if config.attention == "global":
            encoder_class, dilations = VitRpbEncoder, [None] * config.depth
        else:
            encoder_class, dilations = DinatStage, config.dilations
        self.encoder = encoder_class(
            weights, f"{prefix}encoder", config, dim=config.embed_dim, num_heads=config.num_heads,
            dilations=dilations, downsample=False,
        )
        self.layernorm = LayerNorm(weights, f"{prefix}layernorm", config.embed_dim, config.layer_norm_eps)

    def _check_grid(self, pixel_values: np.ndarray) -> None:
        """ViT-rpb's bias table is made for one token grid: refuse images that do not give it."""
        config = self.config
        height, width = pixel_values.shape[2:]
        patch, side = config.patch_size, config.grid_size
        grid = (-(-height // patch), -(-width // patch))
        if config.attention == "global" and grid != (side, side):
            raise ValueError(
                f"this ViT-rpb model's relative position bias is made for {side}x{side} tokens, i.e. images of "
                f"{(side - 1) * patch + 1} to {side * patch} pixels per side (it was trained at "
                f"{config.image_size}x{config.image_size}); got {height}x{width} pixels ({grid[0]}x{grid[1]} tokens)"
            )

    def _forward(
        self, pixel_values: np.ndarray, output_hidden_states: bool, output_attentions: bool
    ) -> tuple[DinatModelOutput, Any]:
        """The outputs (NumPy), and the pooled features still on the backend, for a head to use."""
        pixels = self._check_pixels(pixel_values)
        self._check_grid(pixel_values)
        # Patches, the layers, a final LayerNorm, and the global average pool that a head reads.
        embedded = self.embeddings(pixels)
        x, _, attention = self.encoder(embedded, output_attentions)
        sequence = self.layernorm(x)
        pooled = self.ops.mean_pool(sequence) if self.add_pooling_layer else None
        hidden_states = (self.ops.download(embedded), self.ops.download(x)) if output_hidden_states else None
        return DinatModelOutput(
            last_hidden_state=self.ops.download(sequence),
            pooler_output=None if pooled is None else self.ops.download(pooled),
            hidden_states=hidden_states,
            attentions=(self.ops.download(attention),) if output_attentions else None,
            reshaped_hidden_states=tuple(h.transpose(0, 3, 1, 2) for h in hidden_states) if hidden_states else None,
        ), pooled


class NatIsotropicForImageClassification(DinatForImageClassification):
    """An isotropic model with a linear classifier on the pooled features; the base model is
    ``self.nat_isotropic``, its weights ``nat_isotropic.*``, the head's ``classifier.*`` (SHI-Labs' ``head``)."""

    config_class = NatIsotropicConfig
    base_model_class = NatIsotropicModel
