"""DiNAT_s: the DiNAT paper's Swin-style variant, orchestrating the ops of one compute backend.

Swin's hierarchy with Swin's attention replaced: an image is cut into 4x4 patches (a 4x4 stride-4
convolution, the image zero-padded to a multiple of 4, then LayerNorm), four stages of DiNAT's transformer
layers (neighborhood attention, dilated in every other layer; no layer scale) with 2x2 patch merging
between stages, and finally LayerNorm, average pooling and a linear head. Everything but the tokenizer
and the downsampler is DiNAT's (``modeling.py``); the weights are named as DiNAT's, under ``dinat_s.``.
"""

from __future__ import annotations

from .configuration_family import DinatSConfig
from .kernels import Linear
from .kernels.backend import Array
from .modeling import (
    DinatBackbone,
    DinatEncoder,
    DinatForImageClassification,
    DinatModel,
    DinatStage,
)
from .modeling_utils import DEFAULT_LAYER_NORM_EPS, LayerNorm, PatchEmbeddings, Weights

__all__ = [
    "DinatSBackbone", "DinatSEncoder", "DinatSForImageClassification", "DinatSModel", "DinatSPatchMerging",
    "DinatSStage",
]


class DinatSPatchMerging:
    """Between stages: each 2x2 block of tokens becomes one, its four neighbours' channels side by side
    (offsets (0,0), (1,0), (0,1), (1,1); an odd map zero-padded), then LayerNorm over the 4C channels and a
    linear 4C -> 2C without bias: half the resolution, twice the channels."""

    def __init__(self, weights: Weights, name: str, dim: int) -> None:
        self.ops = weights.backend
        self.norm = LayerNorm(weights, f"{name}.norm", 4 * dim, DEFAULT_LAYER_NORM_EPS)
        self.reduction: Linear = weights.linear(f"{name}.reduction", 4 * dim, 2 * dim, bias=False)

    def __call__(self, x: Array) -> Array:
        return self.ops.linear(self.norm(self.ops.patch_merging(x)), self.reduction)


class DinatSStage(DinatStage):
    """DiNAT's stage, with patch merging as its downsampler."""

    downsampler_class = DinatSPatchMerging


class DinatSEncoder(DinatEncoder):
    """The stages (``levels``); from one to the next the channels double and the resolution halves."""

    stage_class = DinatSStage


class DinatSModel(DinatModel):
    """The bare DiNAT_s encoder: final LayerNorm'd feature map and (optionally) its average; outputs as
    ``DinatModel``'s (``hidden_states``: the embeddings, then each stage's output after patch merging)."""

    config_class = DinatSConfig
    embeddings_class = PatchEmbeddings
    encoder_class = DinatSEncoder


class DinatSForImageClassification(DinatForImageClassification):
    """DiNAT_s with a linear classifier on the pooled features; the base model is ``self.dinat_s``, its
    weights ``dinat_s.*``, the head's ``classifier.*`` (SHI-Labs' ``head``)."""

    config_class = DinatSConfig
    base_model_class = DinatSModel


class DinatSBackbone(DinatBackbone):
    """Multi-scale feature maps for dense tasks (``config.out_features``): each chosen stage's output before
    patch merging, through a LayerNorm of its own (``hidden_states_norms.<stage>``, as DiNAT's backbone)."""

    config_class = DinatSConfig
    embeddings_class = PatchEmbeddings
    encoder_class = DinatSEncoder
