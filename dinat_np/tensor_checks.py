"""Checks on the values of a model's tensors, made where they are read (before a model is built)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .configuration import DinatConfig

__all__ = ["BadWeightsError", "check_tensor_values"]

# A model whose tensors are missing is built with stand-ins so that every problem is reported at once;
# those may take up to this many values beyond what the file holds (64 MiB of float32).
_STAND_IN_SLACK = 2**24


class BadWeightsError(ValueError):
    """Tensors that cannot make a working model: NaN or infinite values, or far too few values."""


def check_tensor_values(tensors: Mapping[str, np.ndarray], config: DinatConfig, source: str) -> None:
    """Refuse non-finite floating values, and tensors holding far fewer values than ``config`` needs.

    The second check bounds the memory spent before the tensor names and shapes are compared: a
    tiny weights file next to a config.json describing a huge model is refused here, not after
    building that model.
    """
    held = sum(int(tensor.size) for tensor in tensors.values())
    needed = config.parameter_count(head=False)
    if needed > 2 * held + _STAND_IN_SLACK:
        raise BadWeightsError(
            f"{source} holds {held:,} values, but the configuration describes a model of {needed:,} "
            "parameters: the weights and the configuration do not belong together"
        )
    bad = sorted(name for name, tensor in tensors.items() if tensor.dtype.kind == "f" and not np.isfinite(tensor).all())
    if bad:
        raise BadWeightsError(
            f"{source}: tensors with NaN/inf values: {', '.join(bad[:10])}" + (" ..." if len(bad) > 10 else "")
        )
