"""Convert DiNAT / NAT checkpoints to dinat-np's folder format (HF ``config.json`` + ``model.safetensors``).

Accepted sources, none of which needs PyTorch and none of which can run code:

- an original SHI-Labs classification checkpoint (``.pth``: fused ``qkv``, ``rpb``, ``gamma1``/``gamma2``,
  ``head``, ...), as published for DiNAT and NAT;
- a Hugging Face ``pytorch_model.bin`` or ``model.safetensors`` (names ``dinat.*`` / ``nat.*``);
- a Hugging Face folder holding one of those and its ``config.json``;
- an original DiNAT_s or NATIsotropic checkpoint (NAT / DiNAT isotropic, ViT-rpb), with the arguments its
  constructor was built with or a registry entry: see :mod:`dinat_np.convert_family`.

The weights tell the architecture (embed_dim, depths, num_heads, kernel_size, mlp_ratio, layer scale,
number of classes) but not the dilations of DiNAT; those come from a registry entry (``model=``) or a
``config.json`` (the source folder's, or ``config=``).  ``original_names._NAME_TABLE`` is the single place
where original names are mapped to HF names.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from .configuration import CONFIG_NAME, DinatConfig, ModelConfig, make_shareable, read_json_object
from .convert_family import convert_family_state_dict, evaluation_transform, family_config, read_original_args
from .labels import load_label_set  # the one label-file reader; re-exported for callers of this module
from .original_names import _HF_BODY, _HF_MARK, _ORIGINAL_MARK, ConversionError, original_to_hf  # re-exported
from .registry import registry_entry
from .state_dict import (
    STORAGE_DTYPES,
    WEIGHTS_NAME,
    SafetensorsError,
    WeightsMismatchError,
    read_safetensors,
    write_safetensors,
)
from .staging import make_staging_dir
from .tensor_checks import BadWeightsError, check_tensor_values
from .torch_archive import is_torch_zip
from .torch_pickle import TorchCheckpointError, load_torch_checkpoint

__all__ = [
    "ConversionError",
    "DTYPES",
    "convert_checkpoint",
    "convert_state_dict",
    "read_checkpoint",
    "original_to_hf",
    "infer_architecture",
    "load_label_set",
]

DTYPES = STORAGE_DTYPES
# Builds the model from (config, tensors, source); WeightsMismatchError when they do not fit.
WeightsCheck = Callable[[DinatConfig, Mapping[str, np.ndarray], str], None]
PROVENANCE_NAME = "conversion.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
LOCK_NAME = ".dinat-convert.lock"


def _split_hf(tensors: Mapping[str, np.ndarray]) -> tuple[str | None, dict[str, np.ndarray]]:
    """HF tensors without their base prefix; returns (prefix found or None, body)."""
    prefixes = {name.split(".", 1)[0] for name in tensors if _HF_MARK.search(name)}
    prefixes.discard("encoder")  # a base model saved on its own has no prefix
    if len(prefixes) > 1:
        raise ConversionError(f"the checkpoint mixes base-model prefixes {sorted(prefixes)}")
    prefix = prefixes.pop() if prefixes else None
    body: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if prefix is not None and name.startswith(prefix + "."):
            name = name[len(prefix) + 1:]
        body[name] = tensor
    return prefix, body


def detect_layout(tensors: Mapping[str, np.ndarray]) -> str:
    """``"original"`` (SHI-Labs names) or ``"hf"`` (Hugging Face names)."""
    original = any(_ORIGINAL_MARK.search(n) for n in tensors)
    hf = any(_HF_MARK.search(n) for n in tensors)
    if original and not hf:
        return "original"
    if hf and not original:
        return "hf"
    raise ConversionError(
        "cannot tell the checkpoint's layout: expected SHI-Labs names (levels.i.blocks.j.attn.qkv.weight, ...) "
        "or Hugging Face names (dinat.encoder.levels.i.layers.j.attention.self.query.weight, ...); "
        f"found e.g. {sorted(tensors)[:5]}"
    )


# ---------------------------------------------------------------------------------------------
# Architecture inference


def _shape(body: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    if name not in body:
        raise ConversionError(f"missing tensor {name!r}, needed to infer the architecture")
    return tuple(body[name].shape)


def infer_architecture(body: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """What HF-named tensors (without base prefix) tell about the model.

    Returns a dict with ``embed_dim``, ``num_channels``, ``depths``, ``num_heads``, ``kernel_size``,
    ``mlp_ratio``, ``qkv_bias``, ``layer_scale`` (bool) and ``num_labels`` (``None`` without a head).

    Raises:
        ConversionError: a tensor needed for inference is missing or shapes disagree.
    """
    w1 = _shape(body, "embeddings.patch_embeddings.projection.1.weight")
    w0 = _shape(body, "embeddings.patch_embeddings.projection.0.weight")
    if len(w0) != 4 or len(w1) != 4:
        raise ConversionError(f"patch embedding weights have shapes {w0} and {w1}, expected 4-D convolutions")
    embed_dim, num_channels = w1[0], w0[1]
    layers: dict[int, set[int]] = {}
    for name in body:
        match = re.match(r"encoder\.levels\.(\d+)\.layers\.(\d+)\.", name)
        if match:
            layers.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ConversionError(f"the checkpoint's levels are not numbered 0..n-1: {sorted(layers)}")
    depths = []
    for level in range(len(layers)):
        found = sorted(layers[level])
        if found != list(range(len(found))):
            raise ConversionError(f"level {level}: layers are not numbered 0..n-1 ({found})")
        depths.append(len(found))
    num_heads, kernels, ratios = [], set(), set()
    for level, depth in enumerate(depths):
        dim = embed_dim * 2**level
        heads_here = set()
        for layer in range(depth):
            base = f"encoder.levels.{level}.layers.{layer}."
            rpb = _shape(body, base + "attention.self.rpb")
            if len(rpb) != 3 or rpb[1] != rpb[2] or rpb[1] % 2 == 0:
                raise ConversionError(f"{base}attention.self.rpb has shape {rpb}, expected (heads, 2k-1, 2k-1)")
            heads_here.add(rpb[0])
            kernels.add((rpb[1] + 1) // 2)
            hidden = _shape(body, base + "intermediate.dense.weight")[0]
            ratios.add(hidden / dim)
        if len(heads_here) != 1:
            raise ConversionError(f"level {level}: layers disagree on the number of heads {sorted(heads_here)}")
        num_heads.append(heads_here.pop())
    if len(kernels) != 1:
        raise ConversionError(f"layers disagree on the kernel size: {sorted(kernels)}")
    # HF sizes the MLP as int(dim * mlp_ratio); the level-0 ratio must reproduce every level.
    ratio = min(ratios)
    for level, depth in enumerate(depths):
        dim = embed_dim * 2**level
        for layer in range(depth):
            hidden = body[f"encoder.levels.{level}.layers.{layer}.intermediate.dense.weight"].shape[0]
            if int(dim * ratio) != hidden:
                raise ConversionError(f"MLP widths are not one mlp_ratio times the level width (level {level})")
    head = body.get("classifier.weight")
    return {
        "embed_dim": int(embed_dim),
        "num_channels": int(num_channels),
        "depths": depths,
        "num_heads": [int(h) for h in num_heads],
        "kernel_size": int(kernels.pop()),
        "mlp_ratio": float(ratio),
        "qkv_bias": "encoder.levels.0.layers.0.attention.self.query.bias" in body,
        "layer_scale": "encoder.levels.0.layers.0.layer_scale_parameters" in body,
        "num_labels": None if head is None else int(head.shape[0]),
    }


# ---------------------------------------------------------------------------------------------
# Reading sources


@dataclass
class Checkpoint:
    """Tensors read from a source, and the ``config.json`` found beside them (if any)."""

    tensors: dict[str, np.ndarray]
    source: Path
    config: dict[str, Any] | None = None
    config_path: Path | None = None


_FOLDER_CANDIDATES = ("model.safetensors", "pytorch_model.bin")


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path, "config file")
    except (OSError, ValueError) as error:
        raise ConversionError(str(error)) from None


def read_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """Read tensors (float32 for every floating dtype) from a file or an HF folder.

    Raises:
        ConversionError: no weights found, or the file is not a valid torch zip / safetensors file.
    """
    src = Path(src)
    config = config_path = None
    if src.is_dir():
        weights = next((src / n for n in _FOLDER_CANDIDATES if (src / n).is_file()), None)
        if weights is None:
            others = sorted(p.name for p in src.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".safetensors"))
            if len(others) != 1:
                raise ConversionError(
                    f"{src}: no model.safetensors or pytorch_model.bin"
                    + (f" (and several candidates: {others}; pass one file)" if others else "")
                )
            weights = src / others[0]
        if (src / CONFIG_NAME).is_file():
            config_path = src / CONFIG_NAME
            config = _read_config_json(config_path)
    elif src.is_file():
        weights = src
        sibling = src.parent / CONFIG_NAME
        if src.name in _FOLDER_CANDIDATES and sibling.is_file():
            config_path, config = sibling, _read_config_json(sibling)
    else:
        raise ConversionError(f"{src} does not exist")

    if weights.stat().st_size == 0:
        raise ConversionError(f"{weights} is empty")
    try:
        if is_torch_zip(weights):
            tensors = load_torch_checkpoint(weights)
        else:
            with open(weights, "rb") as fh:
                head = fh.read(16)
            if weights.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
                tensors = dict(read_safetensors(weights, as_float32=True))
            else:
                tensors = load_torch_checkpoint(weights)  # explains legacy / plain pickle / garbage
    except (TorchCheckpointError, SafetensorsError) as exc:
        raise ConversionError(str(exc)) from None
    out: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if tensor.dtype.kind == "f" and tensor.dtype != np.float32:
            tensor = tensor.astype(np.float32)
        out[name] = tensor
    return Checkpoint(out, weights, config, config_path)


# ---------------------------------------------------------------------------------------------
# Building the config


_ARCH_FIELDS = ("embed_dim", "num_channels", "depths", "num_heads", "kernel_size", "mlp_ratio", "qkv_bias")


def _describe(inferred: Mapping[str, Any]) -> str:
    parts = [f"{k}={inferred[k]}" for k in _ARCH_FIELDS if k in inferred]
    parts.append(f"layer_scale={'yes' if inferred.get('layer_scale') else 'no'}")
    parts.append(f"num_labels={inferred.get('num_labels')}")
    return ", ".join(parts)


def registry_config(entry: Mapping[str, Any]) -> dict[str, Any]:
    """HF config fields from a registry entry (architecture, model type, labels)."""
    arch = dict(entry.get("architecture", {}))
    cfg: dict[str, Any] = {"model_type": entry.get("model_type", "dinat")}
    for key in ("embed_dim", "depths", "num_heads", "kernel_size", "dilations", "mlp_ratio",
                "layer_scale_init_value", "drop_path_rate", "num_channels", "qkv_bias"):
        if key in arch:
            cfg[key] = arch[key]
    label_set = entry.get("label_set")
    if label_set:
        try:
            labels = load_label_set(label_set)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"registry entry {entry.get('name', '?')!r}: {exc}") from None
        cfg["id2label"] = {str(i): text for i, text in enumerate(labels)}
        cfg["label2id"] = {text: i for i, text in enumerate(labels)}
    return cfg


def _normalise_user_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Accept original constructor names (num_classes, layer_scale) next to HF ones."""
    out = dict(cfg)
    if "num_classes" in out:
        out.setdefault("num_labels", out.pop("num_classes"))
    if "layer_scale" in out:
        value = out.pop("layer_scale")
        out.setdefault("layer_scale_init_value", 0.0 if value is None else float(value))
    if "in_chans" in out:
        out.setdefault("num_channels", out.pop("in_chans"))
    return out


def _classes_asked(given: Mapping[str, Any]) -> int:
    """How many classes a configuration asks for: ``num_labels``, or named labels (HF writes two
    ``LABEL_i`` placeholders into every config.json, also a base model's: those ask for nothing)."""
    count = given.get("num_labels")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    id2label = given.get("id2label") or {}
    named = isinstance(id2label, Mapping) and any(str(label) != f"LABEL_{key}" for key, label in id2label.items())
    return len(id2label) if named else 0


def build_config(inferred: Mapping[str, Any], given: Mapping[str, Any] | None, model_type_hint: str | None,
                 source: str, given_from: str) -> DinatConfig:
    """Merge what the weights tell with a registry entry / config.json, checking they agree.

    Raises:
        ConversionError: a disagreement, or dilations unknown for a DiNAT model.
    """
    given = _normalise_user_config(given or {})
    model_type = given.get("model_type") or model_type_hint
    conflicts = []
    for key in _ARCH_FIELDS:
        if key in given and given[key] is not None:
            ours, theirs = inferred[key], given[key]
            same = abs(float(ours) - float(theirs)) < 1e-9 if key == "mlp_ratio" else list(np.atleast_1d(ours)) == list(
                np.atleast_1d(theirs))
            if not same:
                conflicts.append(f"{key}: the weights have {ours}, {given_from} says {theirs}")
    # Whether layer scale is used is decided by the weights (gamma / layer_scale_parameters present).
    layer_scale = float(given.get("layer_scale_init_value", 0.0) or 0.0)
    num_labels = inferred["num_labels"]
    id2label = given.get("id2label")
    if num_labels is not None and "num_labels" in given and given["num_labels"] not in (None, num_labels):
        conflicts.append(f"num_labels: the head has {num_labels} outputs, {given_from} says {given['num_labels']}")
    if num_labels is not None and id2label is not None and len(id2label) != num_labels:
        conflicts.append(f"labels: the head has {num_labels} outputs, {given_from} names {len(id2label)} classes")
    if num_labels is None and (asked := _classes_asked(given)):
        conflicts.append(
            f"num_labels: the checkpoint has no classification head, {given_from} asks for {asked} classes")
    if conflicts:
        raise ConversionError(f"{source} does not match {given_from}:\n  " + "\n  ".join(conflicts))

    if model_type not in (None, "dinat", "nat"):
        raise ConversionError(f"{given_from}: model_type {model_type!r} is not 'dinat' or 'nat'")
    dilations = given.get("dilations")
    if model_type == "nat":
        if dilations is not None and any(d != 1 for stage in dilations for d in stage):
            raise ConversionError(f"{given_from}: a NAT model has no dilations, got {dilations}")
        dilations = None
    elif dilations is None:
        raise ConversionError(
            f"cannot build a config for {source}: the weights give\n  {_describe(inferred)}\n"
            "but not the dilations of a DiNAT model (they are not stored in the weights), nor whether it is a NAT "
            "model.\nPass --model NAME (a registry entry; `dinat-convert --list` shows them) or "
            "--config config.json with \"dilations\" (or \"model_type\": \"nat\")."
        )
    else:
        model_type = "dinat"
        depths = inferred["depths"]
        if (not isinstance(dilations, (list, tuple)) or len(dilations) != len(depths)
                or any(not isinstance(s, (list, tuple)) or len(s) != d
                       for s, d in zip(dilations, depths, strict=True))):
            raise ConversionError(f"{given_from}: dilations {dilations} do not match the checkpoint's depths {depths}")

    if inferred["layer_scale"] and layer_scale <= 0:
        layer_scale = 1e-5  # any positive value enables the parameters; the learned values come from the weights
    if not inferred["layer_scale"]:
        layer_scale = 0.0
    kwargs: dict[str, Any] = {
        key: value for key, value in given.items()
        if key not in ("num_labels", "model_type", "architectures", "transformers_version", "_name_or_path",
                       "torch_dtype", "id2label", "label2id")
    }
    kwargs.update({key: inferred[key] for key in _ARCH_FIELDS})
    kwargs["layer_scale_init_value"] = layer_scale
    if dilations is not None:
        kwargs["dilations"] = [list(map(int, stage)) for stage in dilations]
    else:
        kwargs.pop("dilations", None)
    if num_labels is not None:
        if id2label is not None:
            kwargs["id2label"] = {int(k): str(v) for k, v in id2label.items()}
            if given.get("label2id"):
                kwargs["label2id"] = given["label2id"]
        else:
            kwargs["num_labels"] = num_labels
    try:
        return DinatConfig(model_type=model_type, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"invalid configuration for {source}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Conversion


def _source_preprocessor(ckpt: Checkpoint, model_type: str) -> tuple[bytes | None, str | None]:
    """The ``preprocessor_config.json`` beside the source's ``config.json``, and what became of it:
    kept when dinat-np applies it as transformers does (ViT and ConvNext image processors)."""
    from .preprocessing import ImageProcessor

    path = ckpt.config_path.parent / PREPROCESSOR_NAME if ckpt.config_path is not None else None
    if path is None or not path.is_file():
        return None, None
    try:
        ImageProcessor.from_hf_config(read_json_object(path, "preprocessor configuration"), model_type=model_type)
    except (OSError, ValueError) as error:
        return None, f"{path} not copied: {error}"
    return path.read_bytes(), f"copied from {path}"


def _check_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig, source: str,
                   check_weights: WeightsCheck) -> None:
    """The tensors must form exactly the model that ``config`` describes, with finite values."""
    try:
        check_weights(config, tensors, source)
    except WeightsMismatchError as error:
        lines = [f"the tensors of {source} do not form a complete {config.model_type} model:"]
        for title, names in (("missing", error.missing), ("unexpected", error.unexpected),
                             ("wrong shape", error.misshaped)):
            if names:
                more = " ..." if len(names) > 10 else ""
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names[:10]) + more)
        raise ConversionError("\n".join(lines)) from None


def convert_state_dict(tensors: Mapping[str, np.ndarray], *, check_weights: WeightsCheck,
                       entry: Mapping[str, Any] | None = None,
                       config: Mapping[str, Any] | None = None, source: str = "checkpoint",
                       config_from: str = "config.json") -> tuple[dict[str, np.ndarray], DinatConfig]:
    """Turn a loaded state dict (original or HF names) into HF-named tensors and a checked config.

    Args:
        tensors: the checkpoint's tensors (float32).
        check_weights: builds the model from ``(config, tensors, source)``, raising
            :class:`WeightsMismatchError` for missing, unexpected or misshaped tensors
            (``dinat_np.modeling.check_weights``; the converter does not import the models).
        entry: a registry entry (architecture, dilations, labels), if known.
        config: HF ``config.json`` fields (or original constructor names such as ``num_classes``,
            ``layer_scale``); they override the registry entry.
        source: the checkpoint's name, for messages.
        config_from: where ``config`` came from, for messages.
    """
    layout = detect_layout(tensors)
    given: dict[str, Any] = {}
    given_from = []
    if entry is not None:
        given.update(registry_config(entry))
        given_from.append(f"registry entry {entry.get('name', '?')!r}")
    if config is not None:
        overlay = _normalise_user_config(config)
        for key, value in overlay.items():
            if key in given and key in ("dilations", "model_type") and given[key] != value:
                raise ConversionError(
                    f"{config_from} and registry entry {entry.get('name', '?')!r} disagree on {key}: "
                    f"{value} vs {given[key]}"
                )
            given[key] = value
        given_from.append(config_from)
    described = " and ".join(given_from) or "the given configuration"

    if layout == "original":
        model_type = given.get("model_type") or "dinat"
        hf = original_to_hf(tensors, prefix=model_type)
        prefix_hint = None
        body = {n[len(model_type) + 1:] if n.startswith(model_type + ".") else n: t for n, t in hf.items()}
    else:
        prefix_hint, body = _split_hf(tensors)
        if prefix_hint not in (None, "dinat", "nat"):
            raise ConversionError(f"{source}: unknown base-model prefix {prefix_hint!r} (expected dinat. or nat.)")
    inferred = infer_architecture(body)
    cfg = build_config(inferred, given, prefix_hint, source, described)

    prefix = cfg.weights_prefix
    out: dict[str, np.ndarray] = {}
    for name, tensor in body.items():
        top = name.startswith(_HF_BODY)
        out[f"{prefix}.{name}" if top else name] = tensor
    try:
        check_tensor_values(out, cfg, source)
    except BadWeightsError as error:
        raise ConversionError(str(error)) from None
    _check_tensors(out, cfg, source, check_weights)
    return out, cfg


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *, check_weights: WeightsCheck,
                       model: str | None = None,
                       config: str | os.PathLike | Mapping[str, Any] | None = None, dtype: str = "float32",
                       overwrite: bool = False, provenance: Mapping[str, Any] | None = None,
                       registry: Mapping[str, Any] | None = None,
                       original_args: str | os.PathLike | Mapping[str, Any] | None = None) -> Path:
    """Convert a checkpoint to ``out_dir/config.json`` + ``out_dir/model.safetensors``.

    Nothing is written unless the whole conversion succeeds: both files are made in a temporary
    folder beside ``out_dir`` that is then renamed (or, for an existing ``out_dir`` with
    ``overwrite``, whose files are moved in).

    Args:
        src: original ``.pth``, HF ``pytorch_model.bin`` / ``model.safetensors``, or an HF folder.
        out_dir: the folder to create.
        check_weights: the model check of :func:`convert_state_dict` (``dinat_np.modeling.check_weights``).
        model: a registry name; supplies dilations, labels and a cross-check of the architecture.
        config: a ``config.json`` path or dict (HF fields); overrides the source folder's config.json.
        dtype: storage of floating tensors: ``float32``, ``float16`` or ``bfloat16``.
        overwrite: replace ``config.json`` / ``model.safetensors`` of an existing non-empty ``out_dir``.
        provenance: extra fields for ``conversion.json`` (e.g. download URL and sha256).
        registry: the registry dict to look ``model`` up in (default: the packaged one).
        original_args: for a DiNAT_s / NATIsotropic checkpoint, the arguments SHI-Labs' constructor was
            built with, ``{"constructor": ..., "kwargs": {...}}`` (a dict or a JSON file); see
            :mod:`dinat_np.convert_family`.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConversionError: on any problem; ``out_dir`` is then left as it was.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder")
    above = next((parent for parent in out_dir.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise ConversionError(f"cannot create {out_dir}: {above} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{out_dir} exists and is not empty (use --overwrite to replace its model files)")

    entry = None
    if model is not None:
        try:
            entry = registry_entry(model, registry=registry)
        except LookupError as exc:
            raise ConversionError(str(exc.args[0] if exc.args else exc)) from None
        if entry.get("local"):
            raise ConversionError(f"registry entry {model!r} is a packaged model folder, not a checkpoint to convert")

    ckpt = read_checkpoint(src)
    given = None
    given_from = "config.json"
    if config is not None:
        if isinstance(config, Mapping):
            given, given_from = dict(config), "the given config"
        else:
            given, given_from = _read_config_json(Path(config)), str(config)
    elif ckpt.config is not None:
        given, given_from = ckpt.config, str(ckpt.config_path)

    cfg = family_config(ckpt.tensors, entry=entry, original_args=original_args, config=given, source=str(ckpt.source))
    if cfg is not None:
        tensors = convert_family_state_dict(
            ckpt.tensors, cfg, str(ckpt.source),
            lambda config, tensors, source: _check_tensors(tensors, config, source, check_weights),
        )
    else:
        tensors, cfg = convert_state_dict(ckpt.tensors, check_weights=check_weights, entry=entry, config=given,
                                          source=str(ckpt.source), config_from=given_from)
    record = {
        "converted_by": "dinat-np",
        "source": str(ckpt.source.resolve()),
        "registry_name": model,
        "dtype": dtype,
        "tensors": len(tensors),
    }
    if entry is not None:
        record["preprocessing"] = entry.get("preprocessing")
    preprocessor, preprocessor_note = _source_preprocessor(ckpt, cfg.model_type)
    if preprocessor_note is not None:
        record["preprocessor_config"] = preprocessor_note
    if original_args is not None:
        record["original_args"] = read_original_args(original_args)
        record["preprocessing"] = evaluation_transform(cfg)
    record.update(provenance or {})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = make_staging_dir(out_dir, ".partial")
    try:
        write_safetensors(stage / WEIGHTS_NAME, tensors, dtype)
        cfg.save_pretrained(stage)
        if preprocessor is not None:
            (stage / PREPROCESSOR_NAME).write_bytes(preprocessor)
        (stage / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        make_shareable(stage)  # mkdtemp makes it 0700; a shared cache must stay readable
        _install(stage, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


_LOCK_TIMEOUT = 60.0  # seconds; moving three files in takes milliseconds


def _install(stage: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished files of ``stage`` into ``out_dir``."""
    try:
        # One rename creates out_dir (or replaces an empty one): of two conversions racing to
        # create the same folder, exactly one succeeds.
        os.rename(stage, out_dir)
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not overwrite:
        raise ConversionError(f"{out_dir} was created by another process during the conversion; "
                              "it was left as that process wrote it")
    # Overwriting keeps the folder's other files, so the model's are replaced one by one, under a lock
    # (a file in the folder, so that nothing is left beside it) that keeps two overwriting conversions
    # from mixing their files. config.json goes first and comes back last, so that an interruption
    # leaves a folder that fails to load rather than new weights under an old config.json.
    try:
        with FileLock(out_dir / LOCK_NAME, timeout=_LOCK_TIMEOUT):
            (out_dir / CONFIG_NAME).unlink(missing_ok=True)
            (out_dir / PREPROCESSOR_NAME).unlink(missing_ok=True)  # an old transform must not outlive its model
            for name in (WEIGHTS_NAME, PREPROCESSOR_NAME, PROVENANCE_NAME, CONFIG_NAME):
                if (stage / name).exists():
                    os.replace(stage / name, out_dir / name)
    except Timeout:
        raise ConversionError(f"another process has been writing {out_dir} for {_LOCK_TIMEOUT:.0f} s; "
                              "try again when it is done") from None
    stage.rmdir()
