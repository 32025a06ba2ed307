"""dinat-np: torch-free DiNAT / NAT inference in NumPy and Numba.

``DinatForImageClassification.from_pretrained(folder_or_name)(pixel_values).logits`` mirrors
Hugging Face transformers; ``dinat_np.functional`` holds NATTEN-style neighborhood attention ops.
"""

from .configuration import DinatConfig
from .modeling import (
    BackboneOutput,
    DinatBackbone,
    DinatForImageClassification,
    DinatImageClassifierOutput,
    DinatModel,
    DinatModelOutput,
)
from .state_dict import WeightsMismatchError

__all__ = [
    "BackboneOutput",
    "DinatBackbone",
    "DinatConfig",
    "DinatForImageClassification",
    "DinatImageClassifierOutput",
    "DinatModel",
    "DinatModelOutput",
    "WeightsMismatchError",
]
__version__ = "0.1.0"
