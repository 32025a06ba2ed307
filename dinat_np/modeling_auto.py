"""Model classes chosen by ``config.model_type``, as HF's ``AutoModel*``: every member of the DiNAT family.

``AutoModelForImageClassification.from_pretrained(folder_or_name)`` reads the folder's ``config.json``
(a registry name is downloaded and converted first) and loads the classification model of its
``model_type``: ``dinat`` / ``nat`` (DiNAT, NAT), ``dinat_s`` (DiNAT_s), ``nat_isotropic`` (NAT / DiNAT
isotropic, ViT-rpb).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .configuration import ModelConfig
from .configuration_family import AutoConfig
from .modeling import DinatBackbone, DinatForImageClassification, DinatModel
from .modeling_dinat_s import DinatSBackbone, DinatSForImageClassification, DinatSModel
from .modeling_isotropic import NatIsotropicForImageClassification, NatIsotropicModel
from .modeling_utils import PreTrainedModel, pretrained_folder

__all__ = ["AutoBackbone", "AutoModel", "AutoModelForImageClassification", "check_weights"]


class _AutoClass:
    """Chooses the model class of a config by its ``model_type`` (``MODELS``) and builds or loads it."""

    MODELS: ClassVar[dict[str, type[PreTrainedModel]]] = {}

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated: use from_pretrained or from_config")

    @classmethod
    def model_class(cls, config: ModelConfig) -> type[PreTrainedModel]:
        model_class = cls.MODELS.get(config.model_type)
        if model_class is None:
            raise ValueError(
                f"{cls.__name__} has no model for model_type {config.model_type!r} "
                f"(it has {', '.join(sorted(cls.MODELS))})"
            )
        return model_class

    @classmethod
    def from_config(cls, config: ModelConfig, **kwargs: Any) -> PreTrainedModel:
        """A model of ``config``'s architecture with fresh weights (``seed=`` chooses them)."""
        return cls.model_class(config)(config, **kwargs)

    @classmethod
    def from_pretrained(
        cls, folder_or_name: str | os.PathLike, device: str = "cpu", *, revision: str | None = None,
        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, token: str | bool | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load the model a folder (``config.json`` + ``model.safetensors``), a registry name or a Hub repo id
        holds (``revision``, ``cache_dir``, ``local_files_only``, ``token``: see hub.resolve_model)."""
        folder = pretrained_folder(folder_or_name, check_weights, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)
        model_class = cls.model_class(AutoConfig.from_pretrained(folder))
        return model_class.from_pretrained(folder, device=device, **kwargs)


class AutoModelForImageClassification(_AutoClass):
    MODELS = {
        "dinat": DinatForImageClassification,
        "nat": DinatForImageClassification,
        "dinat_s": DinatSForImageClassification,
        "nat_isotropic": NatIsotropicForImageClassification,
    }


class AutoModel(_AutoClass):
    MODELS = {"dinat": DinatModel, "nat": DinatModel, "dinat_s": DinatSModel, "nat_isotropic": NatIsotropicModel}


class AutoBackbone(_AutoClass):
    MODELS = {"dinat": DinatBackbone, "nat": DinatBackbone, "dinat_s": DinatSBackbone}


def check_weights(config: ModelConfig, tensors: Mapping[str, np.ndarray], source: str) -> None:
    """Build the model ``config`` describes from ``tensors``: its classification model when they carry a
    head, else its bare model (the model classes are the one place that knows every tensor name and
    shape). What a conversion is given to check its result (``convert.convert_checkpoint``)."""
    has_head = any(name.startswith("classifier.") for name in tensors)
    auto = AutoModelForImageClassification if has_head else AutoModel
    auto.model_class(config).check_weights(config, tensors, source)
