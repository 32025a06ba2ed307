"""What the models of the DiNAT family share that is not their architecture.

Output containers with HF's behaviour, the weights a model is built from (asked for by HF name and
shape), the pre-trained-model base class (loading, saving, devices, input checks, the call
convention), HF's classification loss, and the small layers every model of the family is built of.
A model file (``modeling.py``, ``modeling_dinat_s.py``, ``modeling_isotropic.py``) only adds its
architecture on top of these.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .configuration import ModelConfig
from .kernels import Backend, Conv, Linear, Norm, get_backend
from .kernels.backend import Array
from .state_dict import WEIGHTS_NAME, WeightsMismatchError, read_safetensors, write_safetensors
from .tensor_checks import check_tensor_values


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


# ---------------------------------------------------------------------------------------------------
# Weight sources: every layer asks for its tensors by HF name and shape, in one place
# ---------------------------------------------------------------------------------------------------
class Weights:
    """Hands out named tensors to the layers in the backend's layout, and records every mismatch.

    It also remembers how to turn each backend array back into the HF tensor, so that the model keeps
    one copy of its weights (the backend's) and the file it was read from can be unmapped.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, backend: Backend) -> None:
        self.tensors, self.source, self.backend = tensors, source, backend
        self.exports: dict[str, tuple[Array, Callable[[Array], np.ndarray]]] = {}
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
        self, name: str, tensor: np.ndarray, to_backend: Callable[[np.ndarray], Array],
        from_backend: Callable[[Array], np.ndarray],
    ) -> Array:
        array = to_backend(tensor)
        self.exports[name] = (array, from_backend)
        return array

    def tensor(self, name: str, shape: tuple[int, ...], init: str | float = "normal") -> Array:
        ops = self.backend
        return self._hand_out(name, self._fetch(name, shape, init), ops.upload, ops.download)

    def vector(self, name: str, size: int, init: str | float = 0.0) -> Array:
        return self.tensor(name, (size,), init)

    def linear(self, name: str, in_features: int, out_features: int, bias: bool = True) -> Linear:
        """``{name}.weight`` ``(out_features, in_features)`` and, when ``bias``, ``{name}.bias``, as HF's
        ``nn.Linear``."""
        ops = self.backend
        tensor = self._fetch(f"{name}.weight", (out_features, in_features), "normal")
        weight = self._hand_out(f"{name}.weight", tensor, ops.linear_weight, lambda array: ops.download(array).T)
        return Linear(weight, self.vector(f"{name}.bias", out_features) if bias else None)

    def linears_side_by_side(self, names: list[str], in_features: int, out_features: int, bias: bool) -> Linear:
        """Linear layers that read the same input, as one ``(in, len(names) * out)`` weight: one product."""
        ops = self.backend
        tensors = [self._fetch(f"{name}.weight", (out_features, in_features), "normal") for name in names]
        weight = ops.linear_weight(np.concatenate(tensors))
        for k, name in enumerate(names):
            self.exports[f"{name}.weight"] = (
                weight, lambda a, k=k: ops.download(a).T[k * out_features : (k + 1) * out_features]
            )
        if not bias:
            return Linear(weight)
        biases = ops.upload(np.concatenate([self._fetch(f"{name}.bias", (out_features,), 0.0) for name in names]))
        for k, name in enumerate(names):
            self.exports[f"{name}.bias"] = (
                biases, lambda a, k=k: ops.download(a)[k * out_features : (k + 1) * out_features]
            )
        return Linear(weight, biases)

    def conv(self, name: str, in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> Conv:
        """``{name}.weight`` ``(out_channels, in_channels, kernel_size, kernel_size)`` and, when ``bias``,
        ``{name}.bias``, as HF's ``nn.Conv2d``."""
        ops = self.backend
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        tensor = self._fetch(f"{name}.weight", shape, "normal")

        def to_hf(array: Array) -> np.ndarray:  # the backends' (row, column, in) x out layout, back to OIHW
            rows_columns_in_out = ops.download(array).reshape(kernel_size, kernel_size, in_channels, out_channels)
            return rows_columns_in_out.transpose(3, 2, 0, 1)

        weight = self._hand_out(f"{name}.weight", tensor, ops.conv_weight, to_hf)
        return Conv(weight, self.vector(f"{name}.bias", out_channels) if bias else None)

    def layer_norm(self, name: str, dim: int, eps: float) -> Norm:
        """``{name}.weight`` (ones in a fresh model) and ``{name}.bias``, as HF's ``nn.LayerNorm``."""
        return Norm(self.vector(f"{name}.weight", dim, init=1.0), self.vector(f"{name}.bias", dim), eps)

    def check(self, ignored: Callable[[str], bool] = lambda name: False) -> None:
        """Every tensor asked for was there with its shape, and every tensor given was asked for."""
        unexpected = sorted(n for n in self.tensors if n not in self.exports and not ignored(n))
        if self.missing or unexpected or self.misshaped:
            raise WeightsMismatchError(self.source, self.missing, unexpected, self.misshaped)


class RandomWeights(Weights):
    """Fresh weights drawn as HF's ``_init_weights`` does: N(0, initializer_range), zero biases, unit norms."""

    def __init__(self, initializer_range: float, seed: int | None, backend: Backend) -> None:
        super().__init__({}, "random initialisation", backend)
        self.initializer_range, self.rng = initializer_range, np.random.default_rng(seed)

    def _fetch(self, name: str, shape: tuple[int, ...], init: str | float) -> np.ndarray:
        if init == "normal":
            return self.rng.normal(0.0, self.initializer_range, shape).astype(np.float32)
        return np.full(shape, init, np.float32)


# ---------------------------------------------------------------------------------------------------
# Layers the models of the family are built of (HF names; the ops of one backend)
# ---------------------------------------------------------------------------------------------------
# The eps of PyTorch's nn.LayerNorm, which HF's and SHI-Labs' tokenizers and downsamplers keep.
DEFAULT_LAYER_NORM_EPS = 1e-5


class LayerNorm:
    """LayerNorm over the channels (HF's ``nn.LayerNorm``)."""

    def __init__(self, weights: Weights, name: str, dim: int, eps: float) -> None:
        self.ops = weights.backend
        self.params = weights.layer_norm(name, dim, eps)

    def __call__(self, x: Array) -> Array:
        return self.ops.layer_norm(x, self.params)


class Conv3x3Stride2:
    """3x3 convolution, stride 2, padding 1 (HF's ``nn.Conv2d``), on channels-last maps."""

    def __init__(self, weights: Weights, name: str, in_channels: int, out_channels: int, bias: bool) -> None:
        self.ops = weights.backend
        self.params = weights.conv(name, in_channels, out_channels, 3, bias)

    def __call__(self, x: Array) -> Array:
        return self.ops.conv3x3_stride2(x, self.params)


class PatchEmbeddings:
    """Patch tokenizer (DiNAT_s, the isotropic models): a ``patch_size x patch_size`` convolution with stride
    ``patch_size`` (the image zero-padded at the bottom and right to a multiple of it), then LayerNorm when
    ``config.patch_norm``."""

    def __init__(self, weights: Weights, name: str, config: ModelConfig) -> None:
        self.ops = weights.backend
        self.patch_size = config.patch_size
        self.projection = weights.conv(
            f"{name}.patch_embeddings.projection", config.num_channels, config.embed_dim, config.patch_size, bias=True
        )
        self.norm = (LayerNorm(weights, f"{name}.norm", config.embed_dim, DEFAULT_LAYER_NORM_EPS)
                     if config.patch_norm else None)

    def __call__(self, pixels: Array) -> Array:
        x = self.ops.patch_embedding(pixels, self.projection, self.patch_size)
        return x if self.norm is None else self.norm(x)


class AttentionOutput:
    """The attention's output projection ``{name}.dense``, closing the attention's residual branch."""

    def __init__(self, weights: Weights, name: str, dim: int) -> None:
        self.ops = weights.backend
        self.dense = weights.linear(f"{name}.dense", dim, dim)

    def __call__(
        self, context: Array, *, residual: Array, scale: Array, norm: Norm | None = None
    ) -> tuple[Array, Array | None]:
        """``residual + scale * dense(context)``, and its LayerNorm by ``norm`` when given (see the op)."""
        return self.ops.linear_residual(context, self.dense, scale, residual, norm=norm)


class Mlp:
    """The transformer MLP, closing its residual branch: ``dim -> hidden -> dim`` with an activation between.

    HF names its two linear layers after its classes: ``{name}.intermediate.dense`` and
    ``{name}.output.dense``, ``name`` being the transformer layer's.
    """

    def __init__(self, weights: Weights, name: str, dim: int, hidden: int, activation: str) -> None:
        self.ops = weights.backend
        self.fc1 = weights.linear(f"{name}.intermediate.dense", dim, hidden)
        self.fc2 = weights.linear(f"{name}.output.dense", hidden, dim)
        self.activation = activation

    def __call__(
        self, x: Array, *, residual: Array, scale: Array, norm: Norm | None = None
    ) -> tuple[Array, Array | None]:
        """``residual + scale * fc2(activation(fc1(x)))``, and its LayerNorm by ``norm`` when given."""
        return self.ops.mlp_residual(x, self.fc1, self.activation, self.fc2, scale, residual, norm=norm)


# ---------------------------------------------------------------------------------------------------
# The pre-trained-model base class
# ---------------------------------------------------------------------------------------------------
def compiles_kernels_first(call: Callable[..., Any]) -> Callable[..., Any]:
    """For a model's ``__call__``: before a CPU model's first call, the kernels that call launches are
    compiled (or loaded from Numba's cache), with an empty cache in two processes at once
    (``kernels.cpu.compile``); later calls run as they are."""

    @functools.wraps(call)
    def first_compiling(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        if self.device == "cpu" and not self._kernels_ready:
            from .kernels.cpu.compile import compile_for

            self._kernels_ready = True  # first: a failed call compiles as it goes next time, as before
            compile_for(lambda: call(self, *args, **kwargs))
        return call(self, *args, **kwargs)

    return first_compiling


class PreTrainedModel:
    """Loading, saving, devices, input checks and the call convention of the public models.

    A model is built from :class:`Weights` by :meth:`_build`, which each model defines: every layer
    asks for its tensors there, and the model checks once that they all fit. A model that is part of
    a larger one (HF's ``DinatForImageClassification.dinat``) is built from the larger model's weights,
    whose names carry a ``prefix``; the larger model checks them.
    """

    config_class: ClassVar[type]  # each family's configuration class (HF's ``config_class``)
    _kernels_ready = False  # its first call has compiled the kernels it launches (compiles_kernels_first)

    def __init__(
        self,
        config: ModelConfig,
        *,
        tensors: Mapping[str, np.ndarray] | None = None,
        source: str = "",
        device: str = "cpu",
        seed: int | None = 0,
        weights: Weights | None = None,
        prefix: str = "",
    ) -> None:
        """Build from ``tensors`` (HF names; ``source`` names them in errors), else from random weights
        drawn with ``seed``; or, as part of a larger model, from its ``weights`` under ``prefix``."""
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config, self.device = config, device
        self.ops: Backend = get_backend(device)
        if weights is not None:
            self._build(weights, prefix)
        else:
            if tensors is None:
                weights = RandomWeights(config.initializer_range, seed, self.ops)
            else:
                weights = Weights(self._own_tensors(tensors), source, self.ops)
            self._build(weights, prefix)
            weights.check(self._ignored_weight)
        # The backend's arrays by HF name, and how to turn each back into the HF tensor.
        self._exports, self._prefix = weights.exports, prefix

    # -- what each model is made of
    def _build(self, weights: Weights, prefix: str) -> None:
        """Make the model's layers; the names of its weights start with ``prefix``."""
        raise NotImplementedError

    def _own_tensors(self, tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The tensors this model is made of. A checkpoint of a model with a head names its base model's
        weights ``dinat.*`` (``nat.*``): a model without that prefix takes those, without the head."""
        prefix = self.config.weights_prefix + "."
        if not any(name.startswith(prefix) for name in tensors):
            return tensors
        return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}

    def _ignored_weight(self, name: str) -> bool:
        """Whether a tensor of the checkpoint that the model does not use is fine to leave out."""
        return False

    @property
    def base_model(self) -> PreTrainedModel:
        """The bare encoder: the model itself, or the one it holds under ``config.weights_prefix`` (as HF)."""
        return getattr(self, self.config.weights_prefix, self)

    # -- loading and saving
    @classmethod
    def check_weights(cls, config: Any, tensors: Mapping[str, np.ndarray], source: str) -> None:
        """Build this model from ``tensors`` (WeightsMismatchError listing every missing, unexpected or
        misshaped tensor): the check a conversion for it runs."""
        cls(config, tensors=tensors, source=source)

    @classmethod
    def from_pretrained(
        cls, folder_or_name: str | os.PathLike, device: str = "cpu", *, revision: str | None = None,
        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, token: str | bool | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load ``config.json`` + ``model.safetensors`` from a folder, or a registry name or Hub repo id
        through the cache (``revision``, ``cache_dir``, ``local_files_only``, ``token``: see
        :func:`dinat_np.hub.resolve_model`)."""
        folder = pretrained_folder(folder_or_name, cls.check_weights, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file() and (folder / "pytorch_model.bin").is_file():
            raise FileNotFoundError(
                f"{folder} has pytorch_model.bin but no {WEIGHTS_NAME}: convert it once with "
                f"`dinat-convert {folder} OUT_DIR` (no PyTorch needed)"
            )
        config = cls.config_class.from_pretrained(folder)
        tensors = read_safetensors(weights_path)
        check_tensor_values(tensors, config, str(weights_path))
        return cls(config, tensors=tensors, source=str(weights_path), device=device, **kwargs)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's tensors by HF name (float32 NumPy arrays, as loaded)."""
        start = len(self._prefix)
        return {
            name[start:]: np.ascontiguousarray(to_hf(array))
            for name, (array, to_hf) in sorted(self._exports.items())
            if name.startswith(self._prefix)
        }

    def save_pretrained(self, folder: str | os.PathLike, dtype: str = "float32") -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / WEIGHTS_NAME, self.state_dict(), dtype)
        self.config.save_pretrained(folder)

    # -- pickling: the weights travel as their HF state dict, the backend is rebuilt from its device name
    def __getstate__(self) -> dict[str, Any]:
        settings = {name: value for name, value in vars(self).items() if isinstance(value, (bool, int, float, str))}
        return {"config": self.config, "tensors": self.state_dict(), "settings": settings}  # settings: device, ...

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state["settings"])
        PreTrainedModel.__init__(self, state["config"], tensors=state["tensors"], source="a pickled model",
                                 device=self.device)

    def to(self, device: str) -> PreTrainedModel:
        """The same model with its weights on ``device`` ("cpu" or "cuda")."""
        if device == self.device:
            return self
        clone = copy.copy(self)  # keeps subclass settings such as add_pooling_layer
        PreTrainedModel.__init__(clone, self.config, tensors=self.state_dict(), source="the model", device=device)
        return clone

    # -- calling
    def _check_pixels(self, pixel_values: Any) -> Array:
        """``(batch, channels, height, width)`` pixels, checked, as a channels-last array on the backend."""
        if not isinstance(pixel_values, np.ndarray):
            raise TypeError(f"pixel_values must be a NumPy array, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be 4-D (batch, channels, height, width), got shape {pixel_values.shape}"
            )
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

    @staticmethod
    def _resolve(value: bool | None, default: bool = False) -> bool:
        """An optional flag of the call convention (None: the default), as a bool."""
        return default if value is None else bool(value)


def pretrained_folder(folder_or_name: str | os.PathLike, check_weights: Callable[..., None],
                      **hub_options: Any) -> Path:
    """The folder itself, or the cached folder of a registry name or Hub repo id (downloaded and converted
    on first use, the conversion checked by ``check_weights``; ``hub_options``: see hub.resolve_model)."""
    folder = Path(folder_or_name)
    if folder.is_dir():
        return folder
    from .hub import resolve_model  # only needed for names; keeps the import light

    return resolve_model(str(folder_or_name), check_weights=check_weights, **hub_options)


# ---------------------------------------------------------------------------------------------------
# Losses (HF's rule for choosing one by problem_type)
# ---------------------------------------------------------------------------------------------------
def classification_loss(logits: np.ndarray, labels: np.ndarray, config: ModelConfig) -> np.ndarray:
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
