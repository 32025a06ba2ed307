"""DiNAT / NAT models: the architecture of Hassani & Shi, orchestrating the ops of one compute backend.

An image goes through a convolutional tokenizer (two 3x3 stride-2 convolutions, then LayerNorm), four
stages of transformer layers whose attention is (dilated) neighborhood attention, a 3x3 stride-2
convolutional downsampler between stages, and finally LayerNorm, average pooling and a linear head.
Weight names, shapes and output fields are those of Hugging Face transformers' ``modeling_dinat``.
The file reads leaf to root, as that one does; what is not the architecture is in ``modeling_utils``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .configuration import DinatConfig
from .kernels import Linear, Norm
from .kernels.backend import Array
from .modeling_utils import (
    DEFAULT_LAYER_NORM_EPS,
    AttentionOutput,
    Conv3x3Stride2,
    LayerNorm,
    Mlp,
    ModelOutput,
    PreTrainedModel,
    Weights,
    classification_loss,
    compiles_kernels_first,
)
from .state_dict import WeightsMismatchError

# ModelOutput, WeightsMismatchError and classification_loss are also importable from here, as before the split.
__all__ = [
    "BackboneOutput", "DinatBackbone", "DinatDownsampler", "DinatEmbeddings", "DinatEncoder",
    "DinatForImageClassification", "DinatImageClassifierOutput", "DinatLayer", "DinatModel", "DinatModelOutput",
    "DinatPreTrainedModel", "DinatStage", "ModelOutput", "NeighborhoodAttention", "WeightsMismatchError",
    "classification_loss",
]

# HF builds the tokenizer's, downsamplers' and backbone's LayerNorms with PyTorch's default eps, not
# config.layer_norm_eps.
_DEFAULT_LAYER_NORM_EPS = DEFAULT_LAYER_NORM_EPS


# ---------------------------------------------------------------------------------------------------
# Outputs (HF field names; arrays are NumPy)
# ---------------------------------------------------------------------------------------------------
@dataclass
class DinatModelOutput(ModelOutput):
    last_hidden_state: np.ndarray | None = None
    pooler_output: np.ndarray | None = None
    hidden_states: tuple[np.ndarray, ...] | None = None
    attentions: tuple[np.ndarray, ...] | None = None
    reshaped_hidden_states: tuple[np.ndarray, ...] | None = None


@dataclass
class DinatImageClassifierOutput(ModelOutput):
    loss: np.ndarray | None = None
    logits: np.ndarray | None = None
    hidden_states: tuple[np.ndarray, ...] | None = None
    attentions: tuple[np.ndarray, ...] | None = None
    reshaped_hidden_states: tuple[np.ndarray, ...] | None = None


@dataclass
class BackboneOutput(ModelOutput):
    feature_maps: tuple[np.ndarray, ...] | None = None
    hidden_states: tuple[np.ndarray, ...] | None = None
    attentions: tuple[np.ndarray, ...] | None = None


# ---------------------------------------------------------------------------------------------------
# The architecture, leaf to root (every activation is channels-last: batch, height, width, channels)
# ---------------------------------------------------------------------------------------------------
class DinatEmbeddings:
    """Convolutional tokenizer: two overlapping 3x3 stride-2 convolutions (patch size 4), then LayerNorm."""

    def __init__(self, weights: Weights, name: str, config: DinatConfig) -> None:
        dim = config.embed_dim
        projection = f"{name}.patch_embeddings.projection"
        self.conv1 = Conv3x3Stride2(weights, f"{projection}.0", config.num_channels, dim // 2, bias=True)
        self.conv2 = Conv3x3Stride2(weights, f"{projection}.1", dim // 2, dim, bias=True)
        self.norm = LayerNorm(weights, f"{name}.norm", dim, _DEFAULT_LAYER_NORM_EPS)

    def __call__(self, pixels: Array) -> Array:
        return self.norm(self.conv2(self.conv1(pixels)))


class NeighborhoodAttention:
    """Multi-head neighborhood attention with relative position bias: NA, or DiNA when ``dilation`` > 1.

    Each pixel attends to the ``kernel_size x kernel_size`` pixels around it, taking every
    ``dilation``-th one, so a dilated layer sees a ``dilation`` times wider (sparser) window.
    """

    def __init__(
        self, weights: Weights, name: str, config: DinatConfig, *, dim: int, num_heads: int, dilation: int
    ) -> None:
        self.ops = weights.backend
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation = config.kernel_size, dilation
        # Queries, keys and values come from one product of the input: three weights side by side.
        roles = [f"{name}.{role}" for role in ("query", "key", "value")]
        qkv = weights.linears_side_by_side(roles, dim, dim, bias=config.qkv_bias)
        # The attention kernel adds the product's bias as it reads q/k/v (no pass of its own); the
        # result is that of the biased product, zero-padded maps included.
        self.qkv, self.qkv_bias = Linear(qkv.weight), qkv.bias
        span = 2 * config.kernel_size - 1  # relative offsets -(k-1)..(k-1) along each axis
        self.rpb = weights.tensor(f"{name}.rpb", (num_heads, span, span), init=0.0)

    def __call__(self, x: Array, output_attentions: bool) -> tuple[Array, Array | None]:
        """Context ``(batch, height, width, dim)`` before the output projection, and the attention
        probabilities (of the padded map) when asked."""
        batch, height, width, _ = x.shape
        # A map smaller than the dilated window is zero-padded at the bottom right, as HF does: after
        # the norm, so the padding is zeros and not the norm's bias.
        window = self.kernel_size * self.dilation
        padded_height, padded_width = max(height, window), max(width, window)
        padded = (padded_height, padded_width) != (height, width)
        if padded:
            x = self.ops.pad_bottom_right(x, padded_height, padded_width)
        qkv = self.ops.linear(x, self.qkv).reshape(batch, padded_height, padded_width, 3, self.num_heads, self.head_dim)
        context, attention = self.ops.neighborhood_attention(
            qkv, self.rpb, self.kernel_size, self.dilation, self.head_dim**-0.5,
            return_attention=output_attentions, qkv_bias=self.qkv_bias,
        )
        context = context.reshape(batch, padded_height, padded_width, -1)
        return (self.ops.crop(context, height, width) if padded else context), attention


class DinatLayer:
    """Pre-norm transformer layer: x + γ1·W_o·NA(LN(x)), then x + γ2·MLP(LN(x)) (γ: layer scale)."""

    attention_class: ClassVar[type] = NeighborhoodAttention  # ViT-rpb's layer has global attention instead

    def __init__(
        self, weights: Weights, name: str, config: DinatConfig, *, dim: int, num_heads: int, dilation: int
    ) -> None:
        eps = config.layer_norm_eps
        self.layernorm_before = LayerNorm(weights, f"{name}.layernorm_before", dim, eps)
        self.attention = self.attention_class(
            weights, f"{name}.attention.self", config, dim=dim, num_heads=num_heads, dilation=dilation
        )
        self.attention_output = AttentionOutput(weights, f"{name}.attention.output", dim)
        self.layernorm_after = LayerNorm(weights, f"{name}.layernorm_after", dim, eps)
        self.mlp = Mlp(weights, name, dim, int(config.mlp_ratio * dim), config.hidden_act)
        # Per-channel scales of the two branches (CaiT's layer scale); ones when the model has none.
        if config.layer_scale_init_value > 0:
            gamma = weights.tensor(f"{name}.layer_scale_parameters", (2, dim), init=config.layer_scale_init_value)
        else:
            gamma = weights.backend.upload(np.ones((2, dim), np.float32))
        self.gamma1, self.gamma2 = gamma[0], gamma[1]

    def __call__(
        self, x: Array, normed: Array, next_norm: Norm | None, output_attentions: bool
    ) -> tuple[Array, Array | None, Array | None]:
        """The layer on the residual stream ``x``, given ``normed = layernorm_before(x)``: the new ``x``,
        its LayerNorm by ``next_norm`` (the next layer's ``layernorm_before``; None for none), and the
        attention probabilities.

        Each op that closes a residual branch also returns the LayerNorm that reads its result, in the
        same pass over the rows: hence a layer takes its input already normed and hands on the next one's.
        """
        # Residual branch 1: x + γ1 · W_o · NA(LN_before(x))
        context, attention = self.attention(normed, output_attentions)
        x, normed = self.attention_output(context, residual=x, scale=self.gamma1, norm=self.layernorm_after.params)
        # Residual branch 2: x + γ2 · MLP(LN_after(x))
        x, next_normed = self.mlp(normed, residual=x, scale=self.gamma2, norm=next_norm)
        return x, next_normed, attention


class DinatDownsampler:
    """Between stages: a 3x3 stride-2 convolution halving the resolution and doubling the channels, then LayerNorm."""

    def __init__(self, weights: Weights, name: str, dim: int) -> None:
        self.reduction = Conv3x3Stride2(weights, f"{name}.reduction", dim, 2 * dim, bias=False)
        self.norm = LayerNorm(weights, f"{name}.norm", 2 * dim, _DEFAULT_LAYER_NORM_EPS)

    def __call__(self, x: Array) -> Array:
        return self.norm(self.reduction(x))


class DinatStage:
    """Layers at one resolution, one per dilation (DiNAT alternates local NA with sparse global DiNA),
    then the downsampler when another stage follows."""

    # The family's other models change these parts (DiNAT_s merges patches, ViT-rpb attends globally).
    layer_class: ClassVar[type] = DinatLayer
    downsampler_class: ClassVar[type] = DinatDownsampler

    def __init__(
        self, weights: Weights, name: str, config: DinatConfig, *, dim: int, num_heads: int, dilations: list[int],
        downsample: bool,
    ) -> None:
        self.layers = [
            self.layer_class(weights, f"{name}.layers.{i}", config, dim=dim, num_heads=num_heads, dilation=dilation)
            for i, dilation in enumerate(dilations)
        ]
        self.downsample = self.downsampler_class(weights, f"{name}.downsample", dim) if downsample else None

    def __call__(self, x: Array, output_attentions: bool) -> tuple[Array, Array, Array | None]:
        """The stage's output, its output before downsampling, and its last layer's attention probabilities."""
        # Each layer hands the next its input already normed (see DinatLayer): only the first norm runs alone.
        normed = self.layers[0].layernorm_before(x)
        next_norms = [layer.layernorm_before.params for layer in self.layers[1:]] + [None]
        for layer, next_norm in zip(self.layers, next_norms, strict=True):
            x, normed, attention = layer(x, normed, next_norm, output_attentions)
        before_downsampling = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, before_downsampling, attention


@dataclass
class _EncoderResult:
    last_hidden_state: Array
    hidden_states: list[Array]  # embeddings, then each stage's output after downsampling
    before_downsampling: list[Array]  # embeddings, then each stage's output before downsampling
    attentions: list[Array]  # each stage's last layer (HF returns those)


class DinatEncoder:
    """The stages (HF's ``levels``): from one to the next the channels double and the resolution halves."""

    stage_class: ClassVar[type] = DinatStage

    def __init__(self, weights: Weights, name: str, config: DinatConfig) -> None:
        count = len(config.depths)
        self.stages = [
            self.stage_class(
                weights, f"{name}.levels.{i}", config, dim=config.embed_dim * 2**i, num_heads=config.num_heads[i],
                dilations=config.dilations[i], downsample=i < count - 1,
            )
            for i in range(count)
        ]

    def __call__(self, x: Array, output_attentions: bool, keep_states: bool) -> _EncoderResult:
        result = _EncoderResult(x, [x] if keep_states else [], [x] if keep_states else [], [])
        for stage in self.stages:
            x, before_downsampling, attention = stage(x, output_attentions)
            if keep_states:
                result.hidden_states.append(x)
                result.before_downsampling.append(before_downsampling)
            if output_attentions:
                result.attentions.append(attention)
        result.last_hidden_state = x
        return result


# ---------------------------------------------------------------------------------------------------
# Public models
# ---------------------------------------------------------------------------------------------------
class DinatPreTrainedModel(PreTrainedModel):
    """Base of the public DiNAT / NAT models (loading, saving, devices: see ``PreTrainedModel``)."""

    config_class = DinatConfig
    # The tokenizer and the stages; DiNAT_s has its own (patch embedding, patch merging).
    embeddings_class: ClassVar[type] = DinatEmbeddings
    encoder_class: ClassVar[type] = DinatEncoder


class DinatModel(DinatPreTrainedModel):
    """The bare DiNAT encoder: final LayerNorm'd feature map and (optionally) its average."""

    def __init__(self, config: DinatConfig, add_pooling_layer: bool = True, **kwargs: Any) -> None:
        self.add_pooling_layer = add_pooling_layer
        super().__init__(config, **kwargs)

    def _build(self, weights: Weights, prefix: str) -> None:
        config = self.config
        self.embeddings = self.embeddings_class(weights, f"{prefix}embeddings", config)
        self.encoder = self.encoder_class(weights, f"{prefix}encoder", config)
        self.layernorm = LayerNorm(weights, f"{prefix}layernorm", config.hidden_size, config.layer_norm_eps)

    def _forward(
        self, pixel_values: np.ndarray, output_hidden_states: bool, output_attentions: bool
    ) -> tuple[DinatModelOutput, Array | None]:
        """The outputs (NumPy), and the pooled features still on the backend, for a head to use."""
        # Tokenizer, the stages, a final LayerNorm, and the global average pool that a head reads.
        embedded = self.embeddings(self._check_pixels(pixel_values))
        encoded = self.encoder(embedded, output_attentions, output_hidden_states)
        sequence = self.layernorm(encoded.last_hidden_state)
        pooled = self.ops.mean_pool(sequence) if self.add_pooling_layer else None
        hidden_states = tuple(self.ops.download(h) for h in encoded.hidden_states) if output_hidden_states else None
        return DinatModelOutput(
            last_hidden_state=self.ops.download(sequence),
            pooler_output=None if pooled is None else self.ops.download(pooled),
            hidden_states=hidden_states,
            attentions=tuple(self.ops.download(a) for a in encoded.attentions) if output_attentions else None,
            reshaped_hidden_states=tuple(h.transpose(0, 3, 1, 2) for h in hidden_states) if hidden_states else None,
        ), pooled

    @compiles_kernels_first
    def __call__(
        self,
        pixel_values: np.ndarray,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> DinatModelOutput | tuple:
        """Encode ``(batch, channels, height, width)`` pixels; outputs as HF's ``DinatModel``."""
        output, _ = self._forward(pixel_values, self._resolve(output_hidden_states), self._resolve(output_attentions))
        return output if self._resolve(return_dict, True) else output.to_tuple()


class DinatForImageClassification(DinatPreTrainedModel):
    """DiNAT with a linear classifier on the pooled features (``num_labels`` 0 gives the features).

    As in HF, the base model is held as ``dinat`` (``nat`` for NAT: ``config.weights_prefix``, also
    reachable as ``base_model``) and its weights are named ``dinat.*``; the head's are ``classifier.*``.
    """

    base_model_class: ClassVar[type] = DinatModel

    def _build(self, weights: Weights, prefix: str) -> None:
        config = self.config
        base_name = config.weights_prefix
        base = self.base_model_class(config, device=self.device, weights=weights, prefix=f"{prefix}{base_name}.")
        setattr(self, base_name, base)
        labels = config.num_labels
        self.classifier = weights.linear(f"{prefix}classifier", config.hidden_size, labels) if labels > 0 else None

    def _own_tensors(self, tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return tensors  # its checkpoint names the base model's weights `dinat.*` as the model does

    @compiles_kernels_first
    def __call__(
        self,
        pixel_values: np.ndarray,
        labels: np.ndarray | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> DinatImageClassifierOutput | tuple:
        """Class scores for ``(batch, channels, height, width)`` pixels, and the loss when ``labels`` are given."""
        base, pooled = self.base_model._forward(
            pixel_values, self._resolve(output_hidden_states), self._resolve(output_attentions)
        )
        if self.classifier is None:
            logits = base.pooler_output
        else:
            logits = self.ops.download(self.ops.linear(pooled, self.classifier))
        output = DinatImageClassifierOutput(
            loss=None if labels is None else classification_loss(logits, labels, self.config),
            logits=logits,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
            reshaped_hidden_states=base.reshaped_hidden_states,
        )
        return output if self._resolve(return_dict, True) else output.to_tuple()


class DinatBackbone(DinatPreTrainedModel):
    """Multi-scale feature maps ``(batch, channels, height, width)`` for dense tasks (``config.out_features``):
    the tokenizer and the stages, each chosen stage's output (before downsampling) with a LayerNorm of its own."""

    def _build(self, weights: Weights, prefix: str) -> None:
        config = self.config
        self.embeddings = self.embeddings_class(weights, f"{prefix}embeddings", config)
        self.encoder = self.encoder_class(weights, f"{prefix}encoder", config)
        channels = [config.embed_dim] + [config.embed_dim * 2**i for i in range(len(config.depths))]
        self.hidden_states_norms = {
            stage: LayerNorm(
                weights, f"{prefix}hidden_states_norms.{stage}", channels[config.stage_names.index(stage)],
                _DEFAULT_LAYER_NORM_EPS,
            )
            for stage in config.out_features
        }

    def _ignored_weight(self, name: str) -> bool:
        return name.startswith("layernorm.")  # the classification model's final norm; a backbone has none

    @compiles_kernels_first
    def __call__(
        self,
        pixel_values: np.ndarray,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """Feature maps of the stages in ``config.out_features`` (stage outputs before downsampling)."""
        output_hidden_states = self._resolve(output_hidden_states)
        output_attentions = self._resolve(output_attentions)
        encoded = self.encoder(self.embeddings(self._check_pixels(pixel_values)), output_attentions, True)
        feature_maps = tuple(
            self.ops.download(self.hidden_states_norms[stage](state)).transpose(0, 3, 1, 2)
            for stage, state in zip(self.config.stage_names, encoded.before_downsampling, strict=True)
            if stage in self.hidden_states_norms
        )
        hidden_states = (
            tuple(self.ops.download(h) for h in encoded.before_downsampling) if output_hidden_states else None
        )
        attentions = tuple(self.ops.download(a) for a in encoded.attentions) if output_attentions else None
        if not self._resolve(return_dict, True):
            return (feature_maps,) + ((hidden_states,) if hidden_states is not None else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=attentions)

