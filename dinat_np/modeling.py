"""DiNAT / NAT models: the architecture of Hassani & Shi, orchestrating the ops of one compute backend.

An image goes through a convolutional tokenizer (two 3x3 stride-2 convolutions, then LayerNorm), four
stages of transformer layers whose attention is (dilated) neighborhood attention, a 3x3 stride-2
convolutional downsampler between stages, and finally LayerNorm, average pooling and a linear head.
Weight names, shapes and output fields are those of Hugging Face transformers' ``modeling_dinat``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .configuration import DinatConfig
from .kernels import get_backend
from .state_dict import WEIGHTS_NAME, WeightsMismatchError, read_safetensors, write_safetensors
from .tensor_checks import check_tensor_values

# HF builds these LayerNorms with PyTorch's default eps, not config.layer_norm_eps.
_DEFAULT_LAYER_NORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------------
# Outputs (HF field names; arrays are NumPy)
# ---------------------------------------------------------------------------------------------------
class ModelOutput:
    """Dataclass outputs that also index like HF's: by field name, or by position over non-None fields."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


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
# Weight sources: every layer asks for its tensors by HF name and shape, in one place
# ---------------------------------------------------------------------------------------------------
class _Weights:
    """Hands out named tensors to the layers in the backend's layout, and records every mismatch.

    It also remembers how to turn each backend array back into the HF tensor, so that the model keeps
    one copy of its weights (the backend's) and the file it was read from can be unmapped.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, backend: Any) -> None:
        self.tensors, self.source, self.backend = tensors, source, backend
        self.exports: dict[str, tuple[Any, Callable[[Any], np.ndarray]]] = {}
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def _fetch(self, name: str, shape: tuple[int, ...], init: str | float) -> np.ndarray:
        """The tensor ``name``; ``init`` says how a fresh model draws it ("normal", or a constant)."""
        tensor = self.tensors.get(name)
        if tensor is None:
            self.missing.append(name)
        elif tuple(tensor.shape) != shape:
            self.misshaped.append(f"{name} {tuple(tensor.shape)} != expected {shape}")
        else:
            return tensor
        return np.zeros(shape, np.float32)  # placeholder so that every problem is found in one pass

    def _hand_out(
        self, name: str, tensor: np.ndarray, to_backend: Callable[[np.ndarray], Any],
        from_backend: Callable[[Any], np.ndarray],
    ) -> Any:
        array = to_backend(tensor)
        self.exports[name] = (array, from_backend)
        return array

    def tensor(self, name: str, shape: tuple[int, ...], init: str | float = "normal") -> Any:
        ops = self.backend
        return self._hand_out(name, self._fetch(name, shape, init), ops.upload, ops.download)

    def vector(self, name: str, size: int, init: str | float = 0.0) -> Any:
        return self.tensor(name, (size,), init)

    def linear(self, name: str, in_features: int, out_features: int) -> Any:
        ops = self.backend
        tensor = self._fetch(name, (out_features, in_features), "normal")
        return self._hand_out(name, tensor, ops.linear_weight, lambda array: ops.download(array).T)

    def linears_side_by_side(self, names: list[str], in_features: int, out_features: int) -> Any:
        """Linear layers that read the same input, as one ``(in, len(names) * out)`` weight: one product."""
        ops = self.backend
        array = ops.linear_weight(np.concatenate([self._fetch(n, (out_features, in_features), "normal") for n in names]))
        for k, name in enumerate(names):
            self.exports[name] = (array, lambda a, k=k: ops.download(a).T[k * out_features : (k + 1) * out_features])
        return array

    def vectors_side_by_side(self, names: list[str], size: int) -> Any:
        """Bias vectors of :meth:`linears_side_by_side`, concatenated in the same order."""
        ops = self.backend
        array = ops.upload(np.concatenate([self._fetch(name, (size,), 0.0) for name in names]))
        for k, name in enumerate(names):
            self.exports[name] = (array, lambda a, k=k: ops.download(a)[k * size : (k + 1) * size])
        return array

    def conv3x3(self, name: str, in_channels: int, out_channels: int) -> Any:
        ops = self.backend
        tensor = self._fetch(name, (out_channels, in_channels, 3, 3), "normal")

        def to_hf(array: Any) -> np.ndarray:  # the backends' (row, column, in) x out layout, back to OIHW
            return ops.download(array).reshape(3, 3, in_channels, out_channels).transpose(3, 2, 0, 1)

        return self._hand_out(name, tensor, ops.conv_weight, to_hf)

    def check(self, ignored: Callable[[str], bool] = lambda name: False) -> None:
        unexpected = sorted(n for n in self.tensors if n not in self.exports and not ignored(n))
        if self.missing or unexpected or self.misshaped:
            raise WeightsMismatchError(self.source, self.missing, unexpected, self.misshaped)


class _RandomWeights(_Weights):
    """Fresh weights drawn as HF's ``_init_weights`` does: N(0, initializer_range), zero biases, unit norms."""

    def __init__(self, config: DinatConfig, seed: int | None, backend: Any) -> None:
        super().__init__({}, "random initialisation", backend)
        self.config, self.rng = config, np.random.default_rng(seed)

    def _fetch(self, name: str, shape: tuple[int, ...], init: str | float) -> np.ndarray:
        if init == "normal":
            return self.rng.normal(0.0, self.config.initializer_range, shape).astype(np.float32)
        return np.full(shape, init, np.float32)


# ---------------------------------------------------------------------------------------------------
# The architecture
# ---------------------------------------------------------------------------------------------------
class _LayerNorm:
    def __init__(self, weights: _Weights, name: str, dim: int, eps: float) -> None:
        self.weight = weights.vector(f"{name}.weight", dim, init=1.0)
        self.bias = weights.vector(f"{name}.bias", dim)
        self.eps, self.ops = eps, weights.backend

    def __call__(self, x: Any) -> Any:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def with_residual(self, x: Any, weight_t: Any, bias: Any, scale: Any, residual: Any) -> tuple[Any, Any]:
        """``residual + scale * (x @ weight_t + bias)`` and this LayerNorm of it, in one pass over the rows."""
        return self.ops.linear_residual_norm(x, weight_t, bias, scale, residual, self.weight, self.bias, self.eps)

    def with_mlp_residual(
        self, x: Any, fc1_t: Any, fc1_bias: Any, activation: str, fc2_t: Any, fc2_bias: Any, scale: Any, residual: Any
    ) -> tuple[Any, Any]:
        """``residual + scale * MLP(x)`` and this LayerNorm of it (MLP: fc1, ``activation``, fc2), in one launch."""
        return self.ops.mlp_residual_norm(
            x, fc1_t, fc1_bias, activation, fc2_t, fc2_bias, scale, residual, self.weight, self.bias, self.eps
        )


class _Conv3x3Stride2:
    def __init__(self, weights: _Weights, name: str, in_channels: int, out_channels: int, bias: bool) -> None:
        self.ops = weights.backend
        self.weight = weights.conv3x3(f"{name}.weight", in_channels, out_channels)
        self.bias = weights.vector(f"{name}.bias", out_channels) if bias else None

    def __call__(self, x: Any) -> Any:
        return self.ops.conv3x3_stride2(x, self.weight, self.bias)


class DinatEmbeddings:
    """Convolutional tokenizer: two overlapping 3x3 stride-2 convolutions (patch size 4), then LayerNorm."""

    def __init__(self, config: DinatConfig, weights: _Weights, name: str) -> None:
        dim = config.embed_dim
        projection = f"{name}.patch_embeddings.projection"
        self.conv1 = _Conv3x3Stride2(weights, f"{projection}.0", config.num_channels, dim // 2, bias=True)
        self.conv2 = _Conv3x3Stride2(weights, f"{projection}.1", dim // 2, dim, bias=True)
        self.norm = _LayerNorm(weights, f"{name}.norm", dim, _DEFAULT_LAYER_NORM_EPS)

    def __call__(self, pixels_nhwc: Any) -> Any:
        return self.norm(self.conv2(self.conv1(pixels_nhwc)))


class NeighborhoodAttention:
    """Multi-head (dilated) neighborhood attention with relative position bias, and its output projection."""

    def __init__(
        self, config: DinatConfig, weights: _Weights, name: str, dim: int, num_heads: int, dilation: int
    ) -> None:
        self.ops = weights.backend
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation = config.kernel_size, dilation
        span = 2 * config.kernel_size - 1
        # Queries, keys and values come from one product of the input: three weights side by side.
        roles = [f"{name}.self.{role}" for role in ("query", "key", "value")]
        self.qkv = weights.linears_side_by_side([f"{role}.weight" for role in roles], dim, dim)
        self.qkv_bias = weights.vectors_side_by_side([f"{role}.bias" for role in roles], dim) if config.qkv_bias else None
        self.rpb = weights.tensor(f"{name}.self.rpb", (num_heads, span, span), init=0.0)
        self.dense = weights.linear(f"{name}.output.dense.weight", dim, dim)
        self.dense_bias = weights.vector(f"{name}.output.dense.bias", dim)

    def __call__(self, x: Any, output_attentions: bool) -> tuple[Any, Any]:
        """Context ``(batch, height, width, dim)`` before the output projection, and the attention weights."""
        batch, height, width, _ = x.shape
        # The product's bias is folded into the attention kernel (no epilogue pass over q/k/v; see
        # kernels.cpu._na_fused): the result is that of the biased product, zero-padded maps included.
        qkv = self.ops.linear(x, self.qkv).reshape(batch, height, width, 3, self.num_heads, self.head_dim)
        context, attention = self.ops.neighborhood_attention(
            qkv, self.rpb, self.kernel_size, self.dilation, self.head_dim**-0.5, output_attentions,
            qkv_bias=self.qkv_bias,
        )
        return context.reshape(batch, height, width, -1), attention


class DinatLayer:
    """Pre-norm transformer layer: x + γ1·NA(LN(x)), then x + γ2·MLP(LN(x))."""

    def __init__(
        self, config: DinatConfig, weights: _Weights, name: str, dim: int, num_heads: int, dilation: int
    ) -> None:
        self.ops = weights.backend
        hidden = int(config.mlp_ratio * dim)
        # Feature maps smaller than the dilated window are zero-padded for attention, as HF does.
        self.window_size = config.kernel_size * dilation
        # Applied by whoever closes the previous residual branch (see __call__ and DinatStage).
        self.layernorm_before = _LayerNorm(weights, f"{name}.layernorm_before", dim, config.layer_norm_eps)
        self.attention = NeighborhoodAttention(config, weights, f"{name}.attention", dim, num_heads, dilation)
        self.layernorm_after = _LayerNorm(weights, f"{name}.layernorm_after", dim, config.layer_norm_eps)
        self.intermediate = weights.linear(f"{name}.intermediate.dense.weight", dim, hidden)
        self.intermediate_bias = weights.vector(f"{name}.intermediate.dense.bias", hidden)
        self.output = weights.linear(f"{name}.output.dense.weight", hidden, dim)
        self.output_bias = weights.vector(f"{name}.output.dense.bias", dim)
        self.activation = config.hidden_act
        if config.layer_scale_init_value > 0:
            gamma = weights.tensor(f"{name}.layer_scale_parameters", (2, dim), init=config.layer_scale_init_value)
        else:
            gamma = self.ops.upload(np.ones((2, dim), np.float32))
        self.layer_scale = (gamma[0], gamma[1])

    def __call__(
        self, x: Any, normed: Any, output_attentions: bool, next_norm: _LayerNorm | None
    ) -> tuple[Any, Any, Any]:
        """One layer on the residual stream ``x``, given ``normed = layernorm_before(x)``.

        Each residual branch is closed in the same pass as the LayerNorm that reads its result (one
        pass over the rows instead of two): the attention branch with ``layernorm_after``, the MLP
        branch with ``next_norm``, the next layer's ``layernorm_before`` (None for a stage's last
        layer). Returns the new ``x``, ``next_norm(x)`` (or None) and the attention weights.
        """
        batch, height, width, _ = x.shape
        padded_height, padded_width = max(height, self.window_size), max(width, self.window_size)
        if (padded_height, padded_width) != (height, width):  # after the norm, as HF does
            normed = self.ops.pad_bottom_right(normed, padded_height, padded_width)
        context, attention = self.attention(normed, output_attentions)
        if (padded_height, padded_width) != (height, width):
            context = self.ops.crop(context, height, width)
        x, normed = self.layernorm_after.with_residual(
            context, self.attention.dense, self.attention.dense_bias, self.layer_scale[0], x
        )
        mlp = (normed, self.intermediate, self.intermediate_bias, self.activation, self.output, self.output_bias)
        if next_norm is None:
            return self.ops.mlp_residual(*mlp, self.layer_scale[1], x), None, attention
        x, next_normed = next_norm.with_mlp_residual(*mlp, self.layer_scale[1], x)
        return x, next_normed, attention


class DinatDownsampler:
    """3x3 stride-2 convolution doubling the channels, then LayerNorm."""

    def __init__(self, weights: _Weights, name: str, dim: int) -> None:
        self.reduction = _Conv3x3Stride2(weights, f"{name}.reduction", dim, 2 * dim, bias=False)
        self.norm = _LayerNorm(weights, f"{name}.norm", 2 * dim, _DEFAULT_LAYER_NORM_EPS)

    def __call__(self, x: Any) -> Any:
        return self.norm(self.reduction(x))


class DinatStage:
    """Layers alternating dilations (local and sparse global context), then an optional downsampler."""

    def __init__(self, config: DinatConfig, weights: _Weights, name: str, index: int, last: bool) -> None:
        dim = config.embed_dim * 2**index
        self.layers = [
            DinatLayer(config, weights, f"{name}.layers.{i}", dim, config.num_heads[index], dilation)
            for i, dilation in enumerate(config.dilations[index])
        ]
        self.downsample = None if last else DinatDownsampler(weights, f"{name}.downsample", dim)

    def __call__(self, x: Any, output_attentions: bool) -> tuple[Any, Any, Any]:
        """The stage's output, its output before downsampling, and its last layer's attention weights."""
        # Each layer hands the next one its input already normalised (see DinatLayer), so only the
        # first layer's layernorm_before runs on its own.
        normed = self.layers[0].layernorm_before(x)
        following = [layer.layernorm_before for layer in self.layers[1:]] + [None]
        for layer, next_norm in zip(self.layers, following):
            x, normed, attention = layer(x, normed, output_attentions, next_norm)
        before = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, before, attention


@dataclass
class _EncoderResult:
    last_hidden_state: Any
    hidden_states: list[Any]  # embeddings, then each stage's output after downsampling
    before_downsampling: list[Any]  # embeddings, then each stage's output before downsampling
    attentions: list[Any]  # each stage's last layer (HF returns those)


class DinatEncoder:
    def __init__(self, config: DinatConfig, weights: _Weights, name: str) -> None:
        count = len(config.depths)
        self.stages = [
            DinatStage(config, weights, f"{name}.levels.{i}", i, last=i == count - 1) for i in range(count)
        ]

    def __call__(self, x: Any, output_attentions: bool, keep_states: bool) -> _EncoderResult:
        result = _EncoderResult(x, [x] if keep_states else [], [x] if keep_states else [], [])
        for stage in self.stages:
            x, before, attention = stage(x, output_attentions)
            if keep_states:
                result.hidden_states.append(x)
                result.before_downsampling.append(before)
            if output_attentions:
                result.attentions.append(attention)
        result.last_hidden_state = x
        return result


# ---------------------------------------------------------------------------------------------------
# Public models
# ---------------------------------------------------------------------------------------------------
class DinatPreTrainedModel:
    """Loading, input checks and the call convention shared by the three public models."""

    def __init__(
        self,
        config: DinatConfig,
        *,
        tensors: Mapping[str, np.ndarray] | None = None,
        source: str = "",
        device: str = "cpu",
        seed: int | None = 0,
    ) -> None:
        if not isinstance(config, DinatConfig):
            raise TypeError(f"config must be a DinatConfig, got {type(config).__name__}")
        self.config, self.device = config, device
        self.ops = get_backend(device)
        if tensors is None:
            weights: _Weights = _RandomWeights(config, seed, self.ops)
        else:
            weights = _Weights(self._strip_base_prefix(tensors), source, self.ops)
        self._build(weights)
        weights.check(self._ignored_weight)
        self._exports = weights.exports  # the backend's arrays and how to turn them back into HF tensors

    # -- what each model is made of
    def _build(self, weights: _Weights) -> None:
        raise NotImplementedError

    _names_carry_prefix = False  # only the classification model names its weights `dinat.*` / `nat.*`

    def _strip_base_prefix(self, tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        prefix = self.config.weights_prefix + "."
        if self._names_carry_prefix or not any(name.startswith(prefix) for name in tensors):
            return tensors
        # A checkpoint of the classification model: its base weights, without the head.
        return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}

    def _ignored_weight(self, name: str) -> bool:
        return False

    # -- loading and saving
    @classmethod
    def from_pretrained(
        cls, folder_or_name: str | os.PathLike, device: str = "cpu", **kwargs: Any
    ) -> "DinatPreTrainedModel":
        """Load ``config.json`` + ``model.safetensors`` from a folder, or a registry name via the cache."""
        folder = Path(folder_or_name)
        if not folder.is_dir():
            from .hub import resolve_model  # only needed for names; keeps the import light

            folder = resolve_model(str(folder_or_name))
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file() and (folder / "pytorch_model.bin").is_file():
            raise FileNotFoundError(
                f"{folder} has pytorch_model.bin but no {WEIGHTS_NAME}: convert it once with "
                f"`dinat-convert {folder} OUT_DIR` (no PyTorch needed)"
            )
        config = DinatConfig.from_pretrained(folder)
        tensors = read_safetensors(weights_path)
        check_tensor_values(tensors, config, str(weights_path))
        return cls(config, tensors=tensors, source=str(weights_path), device=device, **kwargs)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's tensors by HF name (float32 NumPy arrays, as loaded)."""
        return {name: np.ascontiguousarray(to_hf(array)) for name, (array, to_hf) in sorted(self._exports.items())}

    def save_pretrained(self, folder: str | os.PathLike, dtype: str = "float32") -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / WEIGHTS_NAME, self.state_dict(), dtype)
        self.config.save_pretrained(folder)

    # -- calling
    def _check_pixels(self, pixel_values: Any) -> Any:
        if not isinstance(pixel_values, np.ndarray):
            raise TypeError(f"pixel_values must be a NumPy array, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be 4-D (batch, channels, height, width), got shape {pixel_values.shape}")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the model expects {self.config.num_channels} "
                f"(shape {pixel_values.shape}; the layout is (batch, channels, height, width))"
            )
        if not np.issubdtype(pixel_values.dtype, np.floating):
            raise TypeError(
                f"pixel_values must be floating point (normalised pixels), got {pixel_values.dtype}; "
                "use dinat_np.preprocessing to turn images into model inputs"
            )
        if 0 in pixel_values.shape:
            raise ValueError(f"pixel_values is empty: shape {pixel_values.shape}")
        if not np.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values")
        return self.ops.nchw_to_nhwc(pixel_values)

    def _resolve(self, value: bool | None, default: bool = False) -> bool:
        return default if value is None else bool(value)

    def to(self, device: str) -> "DinatPreTrainedModel":
        """The same model with its weights on ``device`` ("cpu" or "cuda")."""
        if device == self.device:
            return self
        clone = copy.copy(self)  # keeps subclass settings such as add_pooling_layer
        DinatPreTrainedModel.__init__(clone, self.config, tensors=self.state_dict(), source="the model", device=device)
        return clone


class DinatModel(DinatPreTrainedModel):
    """The bare DiNAT encoder: final LayerNorm'd feature map and (optionally) its average."""

    def __init__(self, config: DinatConfig, add_pooling_layer: bool = True, **kwargs: Any) -> None:
        self.add_pooling_layer = add_pooling_layer
        super().__init__(config, **kwargs)

    def _build(self, weights: _Weights, prefix: str = "") -> None:
        config = self.config
        self.embeddings = DinatEmbeddings(config, weights, f"{prefix}embeddings")
        self.encoder = DinatEncoder(config, weights, f"{prefix}encoder")
        self.layernorm = _LayerNorm(weights, f"{prefix}layernorm", config.hidden_size, config.layer_norm_eps)

    def _forward(
        self, pixel_values: np.ndarray, output_hidden_states: bool, output_attentions: bool
    ) -> tuple[DinatModelOutput, Any]:
        """The outputs (NumPy), and the pooled features still on the backend, for a head to use."""
        encoded = self.encoder(self.embeddings(self._check_pixels(pixel_values)), output_attentions, output_hidden_states)
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


class DinatForImageClassification(DinatModel):
    """DiNAT with a linear classifier on the pooled features (``num_labels`` 0 gives the features)."""

    def __init__(self, config: DinatConfig, **kwargs: Any) -> None:
        super().__init__(config, add_pooling_layer=True, **kwargs)

    _names_carry_prefix = True

    def _build(self, weights: _Weights) -> None:
        super()._build(weights, prefix=f"{self.config.weights_prefix}.")
        labels, features = self.config.num_labels, self.config.hidden_size
        if labels > 0:
            self.classifier = weights.linear("classifier.weight", features, labels)
            self.classifier_bias = weights.vector("classifier.bias", labels)

    def __call__(
        self,
        pixel_values: np.ndarray,
        labels: np.ndarray | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> DinatImageClassifierOutput | tuple:
        """Class scores for ``(batch, channels, height, width)`` pixels, and the loss when ``labels`` are given."""
        base, pooled = self._forward(pixel_values, self._resolve(output_hidden_states), self._resolve(output_attentions))
        if self.config.num_labels > 0:
            logits = self.ops.download(self.ops.linear(pooled, self.classifier, self.classifier_bias))
        else:
            logits = base.pooler_output
        output = DinatImageClassifierOutput(
            loss=None if labels is None else classification_loss(logits, labels, self.config),
            logits=logits,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
            reshaped_hidden_states=base.reshaped_hidden_states,
        )
        return output if self._resolve(return_dict, True) else output.to_tuple()


class DinatBackbone(DinatPreTrainedModel):
    """Multi-scale feature maps ``(batch, channels, height, width)`` for dense tasks (``config.out_features``)."""

    def _build(self, weights: _Weights) -> None:
        config = self.config
        self.embeddings = DinatEmbeddings(config, weights, "embeddings")
        self.encoder = DinatEncoder(config, weights, "encoder")
        channels = [config.embed_dim] + [config.embed_dim * 2**i for i in range(len(config.depths))]
        self.hidden_states_norms = {
            stage: _LayerNorm(
                weights, f"hidden_states_norms.{stage}", channels[config.stage_names.index(stage)],
                _DEFAULT_LAYER_NORM_EPS,
            )
            for stage in config.out_features
        }

    def _ignored_weight(self, name: str) -> bool:
        return name.startswith("layernorm.")  # the classification model's final norm; a backbone has none

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
            for stage, state in zip(self.config.stage_names, encoded.before_downsampling)
            if stage in self.hidden_states_norms
        )
        hidden_states = (
            tuple(self.ops.download(h) for h in encoded.before_downsampling) if output_hidden_states else None
        )
        attentions = tuple(self.ops.download(a) for a in encoded.attentions) if output_attentions else None
        if not self._resolve(return_dict, True):
            return (feature_maps,) + ((hidden_states,) if hidden_states is not None else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=attentions)


# ---------------------------------------------------------------------------------------------------
# Losses (HF's rule for choosing one by problem_type)
# ---------------------------------------------------------------------------------------------------
def classification_loss(logits: np.ndarray, labels: np.ndarray, config: DinatConfig) -> np.ndarray:
    """Cross-entropy, MSE or BCE-with-logits, chosen by ``config.problem_type`` as HF does."""
    labels = np.asarray(labels)
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif np.issubdtype(labels.dtype, np.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    logits = logits.astype(np.float64)
    if problem == "regression":
        target = labels.astype(np.float64)
        prediction = logits.squeeze() if config.num_labels == 1 else logits
        target = target.squeeze() if config.num_labels == 1 else target
        if prediction.shape != target.shape:
            raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}")
        return np.float32(np.mean((prediction - target) ** 2))
    if problem == "single_label_classification":
        targets = labels.reshape(-1).astype(np.int64)
        scores = logits.reshape(-1, config.num_labels)
        if targets.shape[0] != scores.shape[0]:
            raise ValueError(f"{targets.shape[0]} labels for {scores.shape[0]} images")
        kept = targets != -100  # PyTorch's default ignore_index
        if np.any((targets[kept] < 0) | (targets[kept] >= config.num_labels)):
            raise ValueError(f"labels must lie in [0, {config.num_labels}), got {np.unique(targets[kept])}")
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return np.float32(-log_probs[kept, targets[kept]].mean())
    target = labels.astype(np.float64)
    if target.shape != logits.shape:
        raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}")
    # log(1 + exp(-|x|)) keeps the BCE finite for large logits.
    losses = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    return np.float32(losses.mean())
