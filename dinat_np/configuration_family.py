"""Configurations of the DiNAT paper's other classifiers, and ``AutoConfig`` for every family member.

``DinatSConfig`` (``model_type="dinat_s"``): DiNAT_s, Swin's hierarchy with (dilated) neighborhood
attention: a ``patch_size`` x ``patch_size`` stride-``patch_size`` patch embedding, stages of transformer
layers, 2x2 patch merging between stages.

``NatIsotropicConfig`` (``model_type="nat_isotropic"``): one resolution throughout (16x16 patches, 14x14
tokens at 224 pixels); ``attention="neighborhood"`` for NAT / DiNAT isotropic (``kernel_size``, one
dilation per layer) or ``"global"`` for their baseline ViT-rpb (self-attention over all tokens with a
relative position bias table for the ``image_size // patch_size`` grid).

Field defaults are those of SHI-Labs' constructors (``DiNAT_s``, ``NATIsotropic``); the arguments of
those constructors are translated by :mod:`dinat_np.convert_family`.

Tensor names of the engine's folders (HF style, as ``modeling_dinat``; ``P`` is the model type, the
classification model's base prefix):

=====================================================  ===============================================
``P.embeddings.patch_embeddings.projection.weight``     ``(embed_dim, num_channels, patch, patch)``, and
``P.embeddings.patch_embeddings.projection.bias``       ``(embed_dim,)``
``P.embeddings.norm.{weight,bias}``                     LayerNorm after the embedding (``patch_norm``)
``P.encoder.levels.S.layers.L.<layer>`` (DiNAT_s)       stage ``S``, layer ``L``
``P.encoder.layers.L.<layer>`` (isotropic)              layer ``L``
``<layer>.layernorm_before.{weight,bias}``              before attention
``<layer>.attention.self.{query,key,value}.weight``     ``(dim, dim)``; ``.bias`` when ``qkv_bias``
``<layer>.attention.self.rpb``                          ``(heads, 2k-1, 2k-1)``; global: ``(heads, 2L-1, 2L-1)``
``<layer>.attention.output.dense.{weight,bias}``        output projection
``<layer>.layernorm_after.{weight,bias}``               before the MLP
``<layer>.intermediate.dense.{weight,bias}``            MLP ``dim -> int(dim * mlp_ratio)``
``<layer>.output.dense.{weight,bias}``                  MLP back to ``dim``
``P.encoder.levels.S.downsample.norm.{weight,bias}``    patch merging: LayerNorm over ``4 * dim``
``P.encoder.levels.S.downsample.reduction.weight``      ``(2 * dim, 4 * dim)``, no bias
``P.layernorm.{weight,bias}``                           final LayerNorm
``classifier.{weight,bias}``                            the head (absent when ``num_labels`` is 0)
=====================================================  ===============================================

A global attention's bias is read at the key-minus-query offset of the token grid: the entry for
query ``(r, c)`` and key ``(r', c')`` is ``rpb[:, r' - r + L - 1, c' - c + L - 1]``.
"""

from __future__ import annotations

from typing import Any

from .configuration import (
    MAX_CHANNELS,
    MAX_DEPTH,
    MAX_DILATION,
    MAX_EMBED_DIM,
    MAX_KERNEL_SIZE,
    MAX_MLP_RATIO,
    MAX_PARAMETERS,
    MAX_STAGES,
    SUPPORTED_ACTIVATIONS,
    DinatConfig,
    ModelConfig,
    _int_list,
    _is_int,
    _undilated,
    _is_real,
    read_config_json,
)

# The same kind of ranges as DinatConfig's (docs/limits.md): refused before anything is allocated.
MAX_PATCH_SIZE = 256
MAX_IMAGE_SIZE = 4096  # an isotropic model's input side; the preprocessing's largest output side too

__all__ = ["AutoConfig", "CONFIG_CLASSES", "DinatSConfig", "NatIsotropicConfig"]

ATTENTION_KINDS = ("neighborhood", "global")


class _ArchitectureChecks:
    """Field checks shared by the family's configs; each failure names the config class and the field."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def value(self, field: str) -> Any:
        return getattr(self.config, field)

    def positive_int(self, field: str, maximum: int) -> None:
        if not _is_int(self.value(field)) or not 1 <= self.value(field) <= maximum:
            self.config._fail(field, f"must be an integer from 1 to {maximum}, got {self.value(field)!r}")

    def flag(self, field: str) -> None:
        if not isinstance(self.value(field), bool):
            self.config._fail(field, f"must be true or false, got {self.value(field)!r}")

    def positive_number(self, field: str, maximum: float = float("inf")) -> None:
        value = self.value(field)
        if not _is_real(value) or not 0 < value <= maximum or value == float("inf"):
            self.config._fail(field, f"must be a finite number above 0 and at most {maximum}, got {value!r}")

    def kernel_size(self) -> None:
        kernel_size = self.value("kernel_size")
        if not _is_int(kernel_size) or not 1 <= kernel_size <= MAX_KERNEL_SIZE or kernel_size % 2 == 0:
            self.config._fail("kernel_size", f"must be an odd integer from 1 to {MAX_KERNEL_SIZE}, got {kernel_size!r}")

    def dilations(self, dilations: Any, lengths: list[int], what: str) -> None:
        """``dilations``: one list of integers >= 1 per entry of ``lengths``, of that length."""
        if not isinstance(dilations, list) or len(dilations) != len(lengths) or any(
            not _int_list(row) or len(row) != length or not all(1 <= d <= MAX_DILATION for d in row)
            for row, length in zip(dilations, lengths, strict=True)
        ):
            self.config._fail("dilations", f"must give an integer from 1 to {MAX_DILATION} for each {what}, "
                                           f"got {dilations!r:.200}")

    def parameters(self) -> None:
        """Refuse a model of more than MAX_PARAMETERS values, before anything is allocated."""
        count = self.config.parameter_count()
        if count > MAX_PARAMETERS:
            self.config._fail("depths", f"the layers would hold about {count:,.0f} parameters, above the limit of "
                                        f"{MAX_PARAMETERS:,}")

    def heads_divide(self, field: str, dims_and_heads: list[tuple[int, Any]]) -> None:
        for dim, heads in dims_and_heads:
            if not _is_int(heads) or heads < 1 or dim % heads:
                self.config._fail(field, f"width {dim} is not divisible by {heads!r} heads")

    def common(self) -> None:
        """The fields both architectures have: embedding, MLP, norms, q/k/v."""
        for field, maximum in (("patch_size", MAX_PATCH_SIZE), ("num_channels", MAX_CHANNELS),
                               ("embed_dim", MAX_EMBED_DIM)):
            self.positive_int(field, maximum)
        for field in ("qkv_bias", "patch_norm"):
            self.flag(field)
        self.positive_number("mlp_ratio", MAX_MLP_RATIO)
        self.positive_number("layer_norm_eps", 1.0)
        self.positive_number("initializer_range")
        if not isinstance(self.value("hidden_act"), str) or self.value("hidden_act") not in SUPPORTED_ACTIVATIONS:
            self.config._fail("hidden_act", f"must be one of {SUPPORTED_ACTIVATIONS}, got {self.value('hidden_act')!r}")


# Fields of both: the patch embedding, the layers' MLP and norms, and what HF configs carry for training.
_COMMON_FIELDS: dict[str, Any] = {
    "num_channels": 3,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "patch_norm": True,  # LayerNorm after the patch embedding
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
}


class DinatSConfig(ModelConfig):
    """Configuration of a DiNAT_s model (defaults: ``DiNAT_s()``, the tiny shapes, every dilation 1).

    ``dilations`` gives one list per stage, one dilation per layer; left out, every layer uses 1.
    """

    model_type = "dinat_s"
    architecture = "DinatSForImageClassification"
    FIELDS = {
        "patch_size": 4,
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "kernel_size": 7,
        "dilations": None,
        **_COMMON_FIELDS,
        "drop_path_rate": 0.2,
    }
    DERIVED = ("hidden_size", "num_layers", "stage_names")
    layer_scale_init_value = 0.0  # DiNAT_s layers have no layer scale

    def __init__(
        self,
        id2label: dict | None = None,
        label2id: dict | None = None,
        num_labels: int | None = None,
        problem_type: str | None = None,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_model_type(type(self), kwargs)
        self._set_fields(kwargs)
        if self.dilations is None:
            self.dilations = _undilated(self.depths)
        self._set_labels(id2label, label2id, num_labels, problem_type)
        self._validate()
        self.out_features, self.out_indices = self._align_outputs(out_features, out_indices)

    # stages as DiNAT's: the same derived fields
    num_layers = DinatConfig.num_layers
    hidden_size = DinatConfig.hidden_size
    stage_names = DinatConfig.stage_names

    def parameter_count(self, head: bool = True) -> int:
        """A lower bound of the values the weights hold (the layers' matrices; the classifier's with ``head``):
        enough to refuse an impossible model, and a file far too small for its config (tensor_checks)."""
        widths = [self.embed_dim * 2**stage for stage, depth in enumerate(self.depths) for _ in range(depth)]
        return _layer_values(widths, self.mlp_ratio, self.num_labels * self.hidden_size if head else 0)

    def _validate(self) -> None:
        checks = _ArchitectureChecks(self)
        checks.common()
        if (not _int_list(self.depths) or not 1 <= len(self.depths) <= MAX_STAGES
                or not all(1 <= depth <= MAX_DEPTH for depth in self.depths)):
            self._fail("depths", f"must list 1 to {MAX_STAGES} stages of 1 to {MAX_DEPTH} layers, "
                                 f"got {self.depths!r:.200}")
        if not isinstance(self.num_heads, list) or len(self.num_heads) != len(self.depths):
            self._fail("num_heads", f"needs one entry per stage ({len(self.depths)}), got {self.num_heads!r}")
        checks.heads_divide("num_heads", [(self.embed_dim * 2**i, h) for i, h in enumerate(self.num_heads)])
        checks.kernel_size()
        checks.dilations(self.dilations, self.depths, "layer of each stage (one list per stage)")
        checks.parameters()

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(out_features=list(self.out_features), out_indices=list(self.out_indices))
        return data


class NatIsotropicConfig(ModelConfig):
    """Configuration of an isotropic model: NAT / DiNAT isotropic, or ViT-rpb (``attention="global"``).

    Defaults: ``NATIsotropic()``, i.e. DiNAT-isotropic small. ``dilations`` gives one dilation per layer;
    left out, layers alternate 1 (even index) and 2, as the original's default ``dilation=2`` does.
    A global attention has neither ``kernel_size`` nor ``dilations`` (both null), and its bias table
    fixes the token grid: inputs must give ``image_size // patch_size`` tokens per side.
    """

    model_type = "nat_isotropic"
    architecture = "NatIsotropicForImageClassification"
    FIELDS = {
        "image_size": 224,
        "patch_size": 16,
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 12,
        "attention": "neighborhood",
        "kernel_size": 7,
        "dilations": None,
        **_COMMON_FIELDS,
        "drop_path_rate": 0.1,
    }
    DERIVED = ("hidden_size", "grid_size")
    layer_scale_init_value = 0.0  # no layer scale either

    def __init__(
        self,
        id2label: dict | None = None,
        label2id: dict | None = None,
        num_labels: int | None = None,
        problem_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        _check_model_type(type(self), kwargs)
        if kwargs.get("attention") == "global":
            for field in ("kernel_size", "dilations"):
                if kwargs.get(field) is not None:
                    self._fail(field, f"global attention has none, got {kwargs[field]!r}")
                kwargs[field] = None
        self._set_fields(kwargs)
        if self.attention == "neighborhood" and self.dilations is None and _is_int(self.depth):
            # not for a depth validation will refuse: a list of 10**9 would take 8 GB first
            self.dilations = [1 if layer % 2 == 0 else 2 for layer in range(min(self.depth, MAX_DEPTH + 1))]
        self._set_labels(id2label, label2id, num_labels, problem_type)
        self._validate()

    @property
    def hidden_size(self) -> int:
        return self.embed_dim

    @property
    def grid_size(self) -> int:
        """Tokens per side at ``image_size``: the grid a global attention's bias table is made for."""
        return self.image_size // self.patch_size

    def parameter_count(self, head: bool = True) -> int:
        """A lower bound of the values the weights hold (the layers' matrices; the classifier's with ``head``)."""
        head_values = self.num_labels * self.embed_dim if head else 0
        return _layer_values([self.embed_dim] * self.depth, self.mlp_ratio, head_values)

    def _validate(self) -> None:
        checks = _ArchitectureChecks(self)
        checks.common()
        checks.positive_int("image_size", MAX_IMAGE_SIZE)
        checks.positive_int("depth", MAX_DEPTH)
        checks.heads_divide("num_heads", [(self.embed_dim, self.num_heads)])
        checks.parameters()
        if self.attention not in ATTENTION_KINDS:
            self._fail("attention", f"must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention == "neighborhood":
            checks.kernel_size()
            checks.dilations([self.dilations], [self.depth], "layer (a list of depth integers)")
        elif self.grid_size < 1:
            self._fail("image_size", f"{self.image_size} is smaller than one {self.patch_size}-pixel patch")


def _layer_values(widths: list[int], mlp_ratio: float, head: int) -> int:
    """At least this many values make a model whose transformer layers have these widths: each layer's
    weight matrices ((4 + 2 * mlp_ratio) * width**2: q, k, v, output, the MLP), plus the ``head``'s."""
    return int(sum((4 + 2 * mlp_ratio) * width * width for width in widths)) + head


_DINAT_ALIASES = ("dinat", "nat")
CONFIG_CLASSES: dict[str, type[ModelConfig]] = {
    **{model_type: DinatConfig for model_type in _DINAT_ALIASES},
    DinatSConfig.model_type: DinatSConfig,
    NatIsotropicConfig.model_type: NatIsotropicConfig,
}


def _check_model_type(cls: type[ModelConfig], kwargs: dict[str, Any]) -> None:
    model_type = kwargs.pop("model_type", cls.model_type)
    if model_type != cls.model_type:
        hint = f" (AutoConfig reads a {model_type!r} config)" if model_type in CONFIG_CLASSES else ""
        raise ValueError(f"{cls.__name__}: model_type must be {cls.model_type!r}, got {model_type!r}{hint}")


class AutoConfig:
    """The configuration class of any family member, chosen by ``model_type`` as HF's ``AutoConfig`` does."""

    def __init__(self) -> None:
        raise TypeError("AutoConfig is not instantiated: use AutoConfig.from_pretrained / from_dict / for_model")

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> ModelConfig:
        """A config of ``model_type`` with ``kwargs`` over its defaults."""
        return AutoConfig.from_dict({"model_type": model_type, **kwargs})

    @staticmethod
    def from_dict(config: dict[str, Any]) -> ModelConfig:
        """The config of ``config["model_type"]``; without one, a DiNAT config, as ``DinatConfig`` reads it."""
        model_type = config.get("model_type", "dinat")
        if model_type not in CONFIG_CLASSES:
            raise ValueError(
                f"model_type {model_type!r} is not a model dinat-np knows; expected one of {sorted(CONFIG_CLASSES)}"
            )
        return CONFIG_CLASSES[model_type].from_dict(config)

    @staticmethod
    def from_pretrained(folder: Any) -> ModelConfig:
        """Read ``folder/config.json`` (or a path to a JSON file) into the class its ``model_type`` names."""
        return AutoConfig.from_dict(read_config_json(folder))
