"""SHI-Labs' original checkpoint names -> Hugging Face names: the one name table of every converter
(``convert`` for DiNAT / NAT, ``convert_family`` for DiNAT_s and the isotropic models), and the error
every conversion raises. A leaf: it imports nothing from the package."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

__all__ = ["ConversionError", "original_to_hf"]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (unreadable, incomplete, inconsistent, ambiguous)."""


# ---------------------------------------------------------------------------------------------
# The name table: original SHI-Labs name (regex) -> HF name template, and how the tensor moves.
#   copy   the tensor is taken as is
#   qkv    the fused (3*dim, ...) projection is split into query / key / value, in that order
#   gamma  gamma1 / gamma2 (dim,) become rows 0 / 1 of layer_scale_parameters (2, dim)
# "{p}" is the base-model prefix ("dinat" or "nat"); "{0}", "{1}", ... are the regex groups.

_BLOCK = r"levels\.(\d+)\.blocks\.(\d+)\."
_LAYER = "{p}.encoder.levels.{0}.layers.{1}."
_NAME_TABLE: tuple[tuple[str, str, str], ...] = (
    (r"patch_embed\.proj\.([01])\.(weight|bias)", "{p}.embeddings.patch_embeddings.projection.{0}.{1}", "copy"),
    (r"patch_embed\.norm\.(weight|bias)", "{p}.embeddings.norm.{0}", "copy"),
    (_BLOCK + r"norm1\.(weight|bias)", _LAYER + "layernorm_before.{2}", "copy"),
    (_BLOCK + r"attn\.qkv\.(weight|bias)", _LAYER + "attention.self.{{qkv}}.{2}", "qkv"),
    (_BLOCK + r"attn\.rpb", _LAYER + "attention.self.rpb", "copy"),
    (_BLOCK + r"attn\.proj\.(weight|bias)", _LAYER + "attention.output.dense.{2}", "copy"),
    (_BLOCK + r"norm2\.(weight|bias)", _LAYER + "layernorm_after.{2}", "copy"),
    (_BLOCK + r"mlp\.fc1\.(weight|bias)", _LAYER + "intermediate.dense.{2}", "copy"),
    (_BLOCK + r"mlp\.fc2\.(weight|bias)", _LAYER + "output.dense.{2}", "copy"),
    (_BLOCK + r"gamma([12])", _LAYER + "layer_scale_parameters", "gamma"),
    (r"levels\.(\d+)\.downsample\.reduction\.weight", "{p}.encoder.levels.{0}.downsample.reduction.weight", "copy"),
    (r"levels\.(\d+)\.downsample\.norm\.(weight|bias)", "{p}.encoder.levels.{0}.downsample.norm.{1}", "copy"),
    (r"norm\.(weight|bias)", "{p}.layernorm.{0}", "copy"),
    (r"head\.(weight|bias)", "classifier.{0}", "copy"),
)
_COMPILED = tuple((re.compile(pattern + r"\Z"), target, kind) for pattern, target, kind in _NAME_TABLE)

# Markers of the two layouts.
_ORIGINAL_MARK = re.compile(r"(^|\.)levels\.\d+\.blocks\.\d+\.")
_HF_MARK = re.compile(r"(^|\.)encoder\.levels\.\d+\.layers\.\d+\.")
_HF_BODY = ("embeddings.", "encoder.", "layernorm.", "pooler.")


def original_to_hf(tensors: Mapping[str, np.ndarray], prefix: str = "dinat") -> dict[str, np.ndarray]:
    """Rename (and split / stack) original SHI-Labs tensors to Hugging Face names.

    Raises:
        ConversionError: a name the table does not know, a ``qkv`` whose rows are not a multiple of
            3, or only one of ``gamma1`` / ``gamma2``.
    """
    out: dict[str, np.ndarray] = {}
    gammas: dict[str, dict[int, np.ndarray]] = {}
    unknown: list[str] = []
    for name, tensor in tensors.items():
        for pattern, target, kind in _COMPILED:
            match = pattern.match(name)
            if match is None:
                continue
            new = target.format(*match.groups(), p=prefix)
            if kind == "copy":
                out[new] = tensor
            elif kind == "qkv":
                if tensor.shape[0] % 3:
                    raise ConversionError(f"{name}: shape {tensor.shape} is not a fused q/k/v projection")
                for part, chunk in zip(("query", "key", "value"), np.split(tensor, 3, axis=0), strict=True):
                    out[new.replace("{qkv}", part)] = chunk
            else:  # gamma
                gammas.setdefault(new, {})[int(match.group(3)) - 1] = tensor
            break
        else:
            unknown.append(name)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} tensor(s) of the original checkpoint have no DiNAT/NAT counterpart: "
            + ", ".join(sorted(unknown)[:12]) + (" ..." if len(unknown) > 12 else "")
        )
    for new, rows in gammas.items():
        if set(rows) != {0, 1}:
            raise ConversionError(f"{new}: the checkpoint has only one of gamma1 / gamma2")
        if rows[0].shape != rows[1].shape or rows[0].ndim != 1:
            raise ConversionError(f"{new}: gamma1 {rows[0].shape} and gamma2 {rows[1].shape} do not match")
        out[new] = np.stack([rows[0], rows[1]])
    return out
