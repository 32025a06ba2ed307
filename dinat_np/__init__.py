"""dinat-np: torch-free DiNAT / NAT inference in NumPy and Numba.

``DinatForImageClassification.from_pretrained(folder_or_name)(pixel_values).logits`` mirrors
Hugging Face transformers (``AutoModelForImageClassification`` loads any model of the DiNAT paper's
family: DiNAT, NAT, DiNAT_s, NAT / DiNAT isotropic, ViT-rpb); ``dinat_np.functional`` holds
NATTEN-style neighborhood attention ops; ``ImageClassifier`` turns image files into labelled predictions.

Names are imported on first use, so that ``import dinat_np`` (and the command-line programs'
start-up) stays light and thread settings can still be applied before NumPy and Numba load.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DinatConfig": "configuration",
    "DinatSConfig": "configuration_family",
    "NatIsotropicConfig": "configuration_family",
    "AutoConfig": "configuration_family",
    "DinatModel": "modeling",
    "DinatForImageClassification": "modeling",
    "DinatBackbone": "modeling",
    "DinatModelOutput": "modeling",
    "DinatImageClassifierOutput": "modeling",
    "BackboneOutput": "modeling",
    "DinatSModel": "modeling_dinat_s",
    "DinatSForImageClassification": "modeling_dinat_s",
    "DinatSBackbone": "modeling_dinat_s",
    "NatIsotropicModel": "modeling_isotropic",
    "NatIsotropicForImageClassification": "modeling_isotropic",
    "AutoModel": "modeling_auto",
    "AutoModelForImageClassification": "modeling_auto",
    "AutoBackbone": "modeling_auto",
    "WeightsMismatchError": "state_dict",
    "ImageClassifier": "classifier",
    "Prediction": "classifier",
    "ImageProcessor": "preprocessing",
    "ImageLoadError": "image_loading",
    "load_image": "image_loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dinat_np' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
