"""The model registry: published DiNAT / NAT checkpoints by name (``weights/registry.json``).

A leaf module (standard library and :mod:`dinat_np.configuration` only), so that the converter, the
preprocessing and the hub can all look names up without importing each other.

Environment:
    DINAT_NP_REGISTRY  path of a registry JSON to use instead of the packaged one
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from .configuration import read_json_object

__all__ = ["ENV_REGISTRY", "UnknownModelError", "load_registry", "packaged_weights_dir", "registry_entry"]

ENV_REGISTRY = "DINAT_NP_REGISTRY"


class UnknownModelError(LookupError):
    """A name that is neither an existing folder, a registry entry nor a DiNAT / NAT Hub repository."""


def packaged_weights_dir() -> Path:
    """The folder of the packaged registry and of the models shipped with the package."""
    return Path(importlib.import_module("dinat_np.weights").__file__).resolve().parent


def load_registry(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The registry's models by name (``path``, else ``$DINAT_NP_REGISTRY``, else the packaged one).

    Raises:
        ValueError: the registry file is not valid.
    """
    if path is None:
        path = os.environ.get(ENV_REGISTRY) or packaged_weights_dir() / "registry.json"
    path = Path(path)
    try:
        data = read_json_object(path, "model registry")
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    models = data.get("models")
    if not isinstance(models, dict):
        raise ValueError(f"model registry {path} has no 'models' object")
    return models


def _as_models(registry: Mapping[str, Any] | str | os.PathLike | None) -> Mapping[str, Any]:
    if registry is None or isinstance(registry, (str, os.PathLike)):
        return load_registry(registry)
    return registry.get("models", registry) if isinstance(registry.get("models"), dict) else registry


def registry_entry(name: str, registry: Mapping[str, Any] | str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of one registry entry, with its ``"name"``; HF repo ids (``shi-labs/...``) work too.

    Args:
        name: a registry name or the ``hf_repo`` of an entry.
        registry: registry dict or path (default: ``$DINAT_NP_REGISTRY`` or the packaged one).

    Raises:
        UnknownModelError: no such entry.
    """
    models = _as_models(registry)
    entry = models.get(name)
    if entry is None:
        entry = next((e for e in models.values() if e.get("hf_repo") and e.get("hf_repo") == name), None)
        if entry is not None:
            name = next(k for k, v in models.items() if v is entry)
    if entry is None:
        raise UnknownModelError(
            f"unknown model {name!r}: not a folder and not in the registry (known: {', '.join(sorted(models))})"
        )
    out = copy.deepcopy(dict(entry))
    out["name"] = name
    return out
