"""Reading and writing ``model.safetensors`` through the ``safetensors`` package, without copying the file.

The reference library checks every file before a byte of it is used: the header, the dtypes and
shapes, and that the tensors tile the data exactly (no overlap, no gap, no trailing bytes); one more
rule is ours, no tensor name twice (the library keeps the last of two identical entries). Tensors are
then views of one read-only memory map: the library's own NumPy reader copies every tensor into
memory, which would double a model's footprint at load. The format holds no code, so loading a
checkpoint can never run any. bfloat16, which NumPy lacks, comes from ``ml_dtypes``.
"""

from __future__ import annotations

import functools

import json
import os
import struct
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .configuration import replace_atomically

WEIGHTS_NAME = "model.safetensors"

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # what write_safetensors stores weight matrices as


@functools.cache
def _bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, imported when a bfloat16 tensor is met (its import takes ~0.7 s of a start-up)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _dtype_of(code: str) -> np.dtype | None:
    """The NumPy dtype of a safetensors dtype code, or None for one dinat-np does not read."""
    return _bfloat16() if code == "BF16" else _DTYPES.get(code)


def _storage_dtype(dtype: str) -> np.dtype:
    return _bfloat16() if dtype == "bfloat16" else np.dtype("<f2")


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file."""


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"  # ml_dtypes' bfloat16 is not of NumPy's kind "f"


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16, as other formats store them) to float32."""
    return np.ascontiguousarray(bits, dtype="<u2").view(_bfloat16()).astype(np.float32)


def _refuse_repeated_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SafetensorsError(f"the header names tensor(s) {repeated} more than once")
    return dict(pairs)


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """The data's start and the header's entries by tensor name (read after the library checked them)."""
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        text = stream.read(length)
    try:
        header = json.loads(text, object_pairs_hook=_refuse_repeated_names)
    except SafetensorsError as error:
        raise SafetensorsError(f"{path} is not a valid safetensors file: {error}") from None
    header.pop("__metadata__", None)
    return 8 + length, header


def read_safetensors(path: str | os.PathLike, as_float32: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, memory-mapped read-only.

    With ``as_float32`` every floating tensor is returned as float32 (float32 ones are views of the
    map; float16/bfloat16/float64 ones are widened or narrowed copies). Otherwise each keeps its
    stored dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
        FileNotFoundError: no such file.
        SafetensorsError: anything the reference library refuses, a name given twice, or a dtype
            dinat-np does not read.
    """
    path = Path(path)
    try:
        with safe_open(path, framework="numpy"):  # the reference check of the whole file
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"no weights file at {path}") from None
    except SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        reason = reason.replace("invalid JSON in header", "the header is not valid JSON")
        raise SafetensorsError(
            f"{path} is not a valid safetensors file (truncated or corrupt, or of another format): {reason}"
        ) from None
    data_start, header = _header(path)
    if not header:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        dtype = _dtype_of(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which dinat-np does not read")
        begin, end = entry["data_offsets"]
        array = mapped[data_start + begin : data_start + end].view(dtype).reshape(entry["shape"])
        if as_float32 and _is_float(dtype) and dtype != np.float32:
            array = array.astype(np.float32)
        tensors[name] = array
    return tensors


def stored_in_reduced_precision(name: str, tensor: np.ndarray) -> bool:
    """Whether ``float16``/``bfloat16`` storage applies to a tensor: weight matrices and kernels only.

    Biases, norms, layer scales and relative position biases (added to the attention logits) stay
    float32: under 1% of the bytes, but most of float16's error on the logits.
    """
    return tensor.dtype.kind == "f" and tensor.ndim >= 2 and not name.endswith((".rpb", "layer_scale_parameters"))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], dtype: str = "float32") -> None:
    """Write ``tensors`` as safetensors (the library writes a temporary file that is renamed when complete).

    Float tensors are stored as float32, weight matrices as ``dtype`` ("float32", "float16" or
    "bfloat16", rounded to nearest even; see :func:`stored_in_reduced_precision`); other dtypes are
    kept. The header says ``"format": "pt"`` so that Hugging Face transformers loads the file too.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        array = np.asarray(tensor)
        if _is_float(array.dtype):
            array = array.astype("<f4", copy=False)
            if dtype != "float32" and stored_in_reduced_precision(name, array):
                array = array.astype(_storage_dtype(dtype))
        elif array.dtype.newbyteorder("<") not in _DTYPES.values() and array.dtype.name != "bfloat16":
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        arrays[name] = np.ascontiguousarray(array)
    metadata = {"format": "pt", "storage": dtype}
    replace_atomically(Path(path), lambda temporary: save_file(arrays, temporary, metadata=metadata))


class WeightsMismatchError(ValueError):
    """A weights file whose tensors do not fit the architecture in config.json."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
        parts = [f"weights in {source} do not match the model configuration:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if names:
                parts.append(f"  {title} ({len(names)}): " + ", ".join(names))
        super().__init__("\n".join(parts))
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
