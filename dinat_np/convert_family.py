"""Conversion of SHI-Labs' DiNAT_s and isotropic checkpoints (``classification/dinats.py``, ``isotropic.py``).

Their weights do not tell the whole architecture (dilations are not stored, and an isotropic model's
weights do not say its image size), so it comes from the arguments the original code was built with,

    {"constructor": "DiNAT_s" | "NATIsotropic", "kwargs": {...}, "label_set": optional}

(an ``--original-args`` JSON file: the keyword arguments of SHI-Labs' constructor, the ViT-rpb layer as
``"layer": "VisionTransformerLayer"``), from a registry entry, or from an engine folder's ``config.json``.

The original names differ from those of SHI-Labs' NAT / DiNAT checkpoints only in their prefixes
(``layers.S.blocks.L.`` for ``levels.S.blocks.L.``, ``layers.L.`` for an isotropic layer) and in the
single patch-embedding convolution; so they are spelled as NAT's and renamed by
:data:`dinat_np.original_names._NAME_TABLE`, the one table of original -> HF names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .configuration import ModelConfig, read_json_object
from .configuration_family import AutoConfig, DinatSConfig, NatIsotropicConfig
from .original_names import _COMPILED, _ORIGINAL_MARK, ConversionError, original_to_hf
from .labels import load_label_set

__all__ = [
    "FAMILY_MODEL_TYPES",
    "ORIGINAL_CONSTRUCTORS",
    "config_from_original_args",
    "config_from_registry_entry",
    "convert_family_state_dict",
    "evaluation_transform",
    "family_config",
    "family_original_to_hf",
    "looks_like_family_original",
    "read_original_args",
    "relative_position_index",
]

FAMILY_MODEL_TYPES = (DinatSConfig.model_type, NatIsotropicConfig.model_type)

# The keyword arguments of SHI-Labs' constructors and their defaults (the JSON-expressible ones).
ORIGINAL_CONSTRUCTORS: dict[str, dict[str, Any]] = {
    "DiNAT_s": {
        "patch_size": 4, "in_chans": 3, "num_classes": 1000, "embed_dim": 96, "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24], "kernel_size": 7, "dilations": None, "mlp_ratio": 4.0, "qkv_bias": True,
        "qk_scale": None, "patch_norm": True,
    },
    "NATIsotropic": {
        "img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000, "embed_dim": 384, "depth": 12,
        "num_heads": 12, "mlp_ratio": 4.0, "qkv_bias": True, "qk_scale": None, "kernel_size": 7, "dilation": 2,
        "layer": "NATransformerLayer", "patch_norm": True,
    },
}
# Arguments that only matter for training: accepted and ignored (drop_path_rate is kept as metadata).
TRAINING_ONLY = ("drop_rate", "attn_drop_rate", "drop_path_rate")
ATTENTION_OF_LAYER = {"NATransformerLayer": "neighborhood", "VisionTransformerLayer": "global"}


# ---------------------------------------------------------------------------------------------
# The architecture, from the original constructor's arguments


def _where(source: str | os.PathLike | Mapping[str, Any]) -> str:
    return "the original arguments" if isinstance(source, Mapping) else str(source)


def read_original_args(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """``{"constructor", "kwargs", "label_set"}`` from a mapping or a JSON file; ConversionError if malformed."""
    if isinstance(source, Mapping):
        args = dict(source)
    else:
        try:
            args = read_json_object(Path(source), "original-arguments file")
        except (OSError, ValueError) as error:
            raise ConversionError(str(error)) from None
    where = _where(source)
    constructor, kwargs = args.get("constructor"), args.get("kwargs", {})
    if constructor not in ORIGINAL_CONSTRUCTORS:
        raise ConversionError(
            f"{where}: \"constructor\" must be one of {sorted(ORIGINAL_CONSTRUCTORS)}, got {constructor!r}"
        )
    if not isinstance(kwargs, dict):
        raise ConversionError(f"{where}: \"kwargs\" must be an object of keyword arguments, got {kwargs!r}")
    extra = sorted(set(args) - {"constructor", "kwargs", "label_set"})
    if extra:
        raise ConversionError(f"{where}: unknown keys {extra} (expected constructor, kwargs, label_set)")
    unknown = sorted(set(kwargs) - set(ORIGINAL_CONSTRUCTORS[constructor]) - set(TRAINING_ONLY))
    if unknown:
        raise ConversionError(
            f"{where}: {constructor} has no argument(s) {unknown} that dinat-np can read; it takes "
            f"{sorted(ORIGINAL_CONSTRUCTORS[constructor])} (and ignores {list(TRAINING_ONLY)})"
        )
    return {"constructor": constructor, "kwargs": dict(kwargs), "label_set": args.get("label_set")}


def config_from_original_args(source: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
    """The engine config of a model built by ``DiNAT_s(**kwargs)`` or ``NATIsotropic(**kwargs)``.

    Raises:
        ConversionError: an unknown constructor or argument, or values the architecture cannot have.
    """
    args, where = read_original_args(source), _where(source)
    kwargs = {**ORIGINAL_CONSTRUCTORS[args["constructor"]], **args["kwargs"]}
    if kwargs["qk_scale"]:  # the original uses `qk_scale or head_dim ** -0.5`
        raise ConversionError(
            f"{where}: qk_scale {kwargs['qk_scale']!r} is not supported: dinat-np scales the attention by "
            "head_dim ** -0.5, as qk_scale=None does (all published models)"
        )
    fields: dict[str, Any] = {
        name: kwargs[name] for name in ("patch_size", "embed_dim", "num_heads", "mlp_ratio", "qkv_bias", "patch_norm")
    }
    fields["num_channels"] = kwargs["in_chans"]
    if "drop_path_rate" in kwargs:
        fields["drop_path_rate"] = kwargs["drop_path_rate"]
    fields.update(_labels(args["label_set"], kwargs["num_classes"], where))
    if args["constructor"] == "DiNAT_s":
        config_class = DinatSConfig
        fields.update(depths=kwargs["depths"], kernel_size=kwargs["kernel_size"], dilations=kwargs["dilations"])
    else:
        config_class = NatIsotropicConfig
        attention = ATTENTION_OF_LAYER.get(kwargs["layer"])
        if attention is None:
            raise ConversionError(
                f"{where}: layer must be one of {sorted(ATTENTION_OF_LAYER)}, got {kwargs['layer']!r}")
        fields.update(image_size=kwargs["img_size"], depth=kwargs["depth"], attention=attention)
        if attention == "neighborhood":
            # Even layers attend locally (dilation 1), odd ones with the model's dilation.
            dilation, depth = kwargs["dilation"], kwargs["depth"]
            layers = range(depth) if isinstance(depth, int) else range(0)
            fields.update(kernel_size=kwargs["kernel_size"], dilations=[1 if i % 2 == 0 else dilation for i in layers])
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{where}: {error}") from None


def evaluation_transform(config: ModelConfig) -> dict[str, Any]:
    """The evaluation transform of SHI-Labs' training code (timm's, crop 0.875) at the model's resolution:
    ``image_size`` for an isotropic model (ViT-rpb runs at no other), 224 for DiNAT_s. Recorded with a
    conversion from original arguments, which do not say how the model was evaluated."""
    resolution = config.image_size if isinstance(config, NatIsotropicConfig) else 224
    return {"resolution": resolution, "crop_pct": 0.875, "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _labels(label_set: str | None, num_classes: Any, where: str) -> dict[str, Any]:
    if label_set is None:
        return {"num_labels": num_classes}
    try:
        names = load_label_set(label_set)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{where}: {error}") from None
    if len(names) != num_classes:
        raise ConversionError(
            f"{where}: label set {label_set!r} names {len(names)} classes, num_classes is {num_classes}")
    return {"id2label": dict(enumerate(names))}


# ---------------------------------------------------------------------------------------------
# Tensor names


def looks_like_family_original(tensors: Mapping[str, np.ndarray]) -> str | None:
    """``"DiNAT_s"`` or ``"NATIsotropic"`` when the names are those of that constructor's state_dict, else None."""
    if any(re.match(r"layers\.\d+\.blocks\.\d+\.attn\.", name) for name in tensors):
        return "DiNAT_s"
    if any(re.match(r"layers\.\d+\.attn\.", name) for name in tensors) and "patch_embed.proj.weight" in tensors:
        return "NATIsotropic"
    return None


def relative_position_index(length: int) -> np.ndarray:
    """For every (query, key) pair of a ``length x length`` token grid (row-major), the position of its bias
    in the flattened ``(2L-1) x (2L-1)`` table: the key's row and column offsets from the query, each
    shifted by ``L - 1`` (ViT-rpb's index, whose flips amount to key minus query)."""
    rows, columns = np.divmod(np.arange(length * length), length)
    row_offset = rows[None, :] - rows[:, None] + length - 1  # [query, key]
    column_offset = columns[None, :] - columns[:, None] + length - 1
    return row_offset * (2 * length - 1) + column_offset


def _canonical_bias_table(table: np.ndarray, stored_index: np.ndarray, name: str) -> np.ndarray:
    """The bias table reordered for :func:`relative_position_index`, given the index the checkpoint stored.

    The original code uses the index it loads, so a checkpoint whose index differs (another code
    version) still loads when its index is a relabelling of the offsets: each offset one table entry.
    """
    if table.ndim != 3 or table.shape[1] != table.shape[2] or table.shape[1] % 2 == 0:
        raise ConversionError(f"{name}: bias table of shape {table.shape}, expected (heads, 2L-1, 2L-1)")
    heads, span = table.shape[0], table.shape[1]
    length = (span + 1) // 2
    tokens = length * length
    # checked before the canonical index is built: its size follows the stored one, bounded by the file
    if stored_index.shape != (tokens, tokens) or stored_index.dtype.kind not in "iu":
        raise ConversionError(
            f"{name}: relative_position_index has shape {stored_index.shape} ({stored_index.dtype}), expected "
            f"integers of shape {(tokens, tokens)} for a {length}x{length} token grid"
        )
    canonical = relative_position_index(length)
    if np.array_equal(stored_index, canonical):
        return table
    pairs = np.unique(np.stack([canonical.ravel(), stored_index.ravel().astype(np.int64)], axis=1), axis=0)
    if len(pairs) != span * span or pairs[:, 1].min() < 0 or pairs[:, 1].max() >= span * span:
        raise ConversionError(
            f"{name}: the stored relative_position_index does not give each relative offset one entry of the "
            "bias table; this is not a ViT-rpb checkpoint dinat-np can read"
        )
    return np.ascontiguousarray(table.reshape(heads, span * span)[:, pairs[:, 1]].reshape(heads, span, span))


def family_original_to_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Rename an original DiNAT_s / NATIsotropic state_dict to the engine's names (see configuration_family).

    Raises:
        ConversionError: names that are not those of ``config``'s constructor, or a ViT-rpb index that
            cannot be honoured.
    """
    isotropic = isinstance(config, NatIsotropicConfig)
    tensors = dict(tensors)
    for name in [n for n in tensors if n.endswith(".attn.relative_position_index")]:
        index = tensors.pop(name)
        if not (isotropic and config.attention == "global"):
            raise ConversionError(f"{name}: a relative_position_index belongs to ViT-rpb layers, not to this model")
        table_name = name.replace("relative_position_index", "rpb")
        if table_name in tensors:
            tensors[table_name] = _canonical_bias_table(tensors[table_name], index, name)
    patch_embedding = {part: tensors.pop(f"patch_embed.proj.{part}") for part in ("weight", "bias")
                       if f"patch_embed.proj.{part}" in tensors}

    # Spelled as NAT's names: an isotropic model is one level of layers, DiNAT_s levels are called layers.
    spelled_as_nat: dict[str, str] = {}
    for name in tensors:
        nat_name = name
        if isotropic:
            nat_name = re.sub(r"\Alayers\.(\d+)\.", r"levels.0.blocks.\1.", name)
        elif re.match(r"layers\.\d+\.(blocks\.\d+|downsample)\.", name):
            nat_name = "levels." + name[len("layers."):]
        spelled_as_nat[nat_name] = name
    unknown = sorted(name for nat_name, name in spelled_as_nat.items()
                     if not any(pattern.match(nat_name) for pattern, _, _ in _COMPILED)
                     or (isotropic and nat_name.startswith("levels.0.downsample")))
    if unknown:
        example = "layers.0.attn.qkv.weight" if isotropic else "layers.0.blocks.0.attn.qkv.weight"
        raise ConversionError(
            f"{len(unknown)} tensor(s) are not part of a {config.model_type} model (whose names are such as "
            f"{example}): " + ", ".join(unknown[:12]) + (" ..." if len(unknown) > 12 else "")
        )
    prefix = config.weights_prefix
    renamed = original_to_hf({nat: tensors[name] for nat, name in spelled_as_nat.items()}, prefix=prefix)
    if isotropic:
        renamed = {re.sub(rf"\A{prefix}\.encoder\.levels\.0\.layers\.", f"{prefix}.encoder.layers.", name): tensor
                   for name, tensor in renamed.items()}
    for part, tensor in patch_embedding.items():
        renamed[f"{prefix}.embeddings.patch_embeddings.projection.{part}"] = tensor
    return renamed


def convert_family_state_dict(
    tensors: Mapping[str, np.ndarray], config: ModelConfig, source: str,
    check_weights: Callable[[ModelConfig, Mapping[str, np.ndarray], str], None],
) -> dict[str, np.ndarray]:
    """The engine's tensors of a DiNAT_s / isotropic checkpoint (original names, or already the engine's),
    checked by ``check_weights(config, tensors, source)`` (building the model is the check)."""
    if config.model_type not in FAMILY_MODEL_TYPES:
        raise ConversionError(f"{source}: model_type {config.model_type!r} is not {' or '.join(FAMILY_MODEL_TYPES)}")
    original = looks_like_family_original(tensors)
    expected = "DiNAT_s" if isinstance(config, DinatSConfig) else "NATIsotropic"
    if original is None and any(_ORIGINAL_MARK.search(name) for name in tensors):
        raise ConversionError(f"{source} holds a NAT / DiNAT checkpoint (levels.i.blocks.j...), not a {expected} one: "
                              "convert it without --original-args (with --model or --config for DiNAT's dilations)")
    if original is not None:
        if original != expected:
            raise ConversionError(f"{source} holds a {original} checkpoint, but the arguments describe a {expected}")
        tensors = family_original_to_hf(tensors, config)
    check_weights(config, tensors, source)
    return dict(tensors)


def family_config(
    tensors: Mapping[str, np.ndarray], *, entry: Mapping[str, Any] | None = None,
    original_args: str | os.PathLike | Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
    source: str = "checkpoint",
) -> ModelConfig | None:
    """The config of a DiNAT_s / isotropic conversion, or None when the checkpoint is a DiNAT / NAT one.

    In order: ``original_args``, a family registry ``entry``, a ``config`` (config.json dict) of a family
    ``model_type``. Raises ConversionError for original DiNAT_s / NATIsotropic weights without any of them.
    """
    if original_args is not None:
        if entry is not None:
            raise ConversionError("give either a registry model or original arguments, not both")
        return config_from_original_args(original_args)
    if entry is not None and entry.get("model_type") in FAMILY_MODEL_TYPES:
        return config_from_registry_entry(entry)
    if config is not None and config.get("model_type") in FAMILY_MODEL_TYPES:
        try:
            return AutoConfig.from_dict(dict(config))
        except ValueError as error:
            raise ConversionError(f"{source}: {error}") from None
    constructor = looks_like_family_original(tensors)
    if constructor is not None:
        raise ConversionError(
            f"{source} is a {constructor} checkpoint, whose weights do not tell its whole architecture: pass "
            f"--original-args ARGS.json with the arguments it was built with, e.g. "
            f'{{"constructor": "{constructor}", "kwargs": {{...}}}}, or --model NAME for a published one '
            "(`dinat-convert --list`)"
        )
    return None


def config_from_registry_entry(entry: Mapping[str, Any]) -> ModelConfig:
    """The config of a family entry of the registry: its architecture (config field names) and label set."""
    fields = dict(entry.get("architecture", {}))
    if entry.get("label_set"):
        try:
            fields["id2label"] = dict(enumerate(load_label_set(entry["label_set"])))
        except (OSError, ValueError) as error:
            raise ConversionError(f"registry entry {entry.get('name', '?')!r}: {error}") from None
    elif entry.get("num_labels") is not None:
        fields["num_labels"] = entry["num_labels"]
    try:
        return AutoConfig.for_model(entry["model_type"], **fields)
    except ValueError as error:
        raise ConversionError(f"registry entry {entry.get('name', '?')!r}: {error}") from None
