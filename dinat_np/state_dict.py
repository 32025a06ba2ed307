"""Reading and writing ``model.safetensors`` without copying the file, and checking tensor names.

The safetensors format is an 8-byte little-endian header length, a JSON header of
``{name: {"dtype", "shape", "data_offsets"}}`` and the raw little-endian data. Reading it ourselves
lets float32 tensors be views of one read-only memory map (no copy of the file in memory), and the
format holds no code, so loading a checkpoint can never run any.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from .configuration import write_atomic

WEIGHTS_NAME = "model.safetensors"

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # no NumPy bfloat16: read the raw bits, widen below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # what write_safetensors stores weight matrices as


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file."""


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32: bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as raw uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def read_safetensors(path: str | os.PathLike, as_float32: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, memory-mapped read-only.

    With ``as_float32`` every floating tensor is returned as float32 (float32 ones are views of the
    map; float16/bfloat16/float64 ones are widened or narrowed copies). Otherwise bfloat16 comes back
    as its raw ``uint16`` bits.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: header length {header_length} does not fit a {size}-byte file")
            header_bytes = stream.read(header_length)
    except FileNotFoundError:
        raise FileNotFoundError(f"no weights file at {path}") from None
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetensorsError(f"{path}: header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)

    data_start = 8 + header_length
    data_size = size - data_start
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has an unsupported or malformed entry {entry!r}") from None
        if any(n < 0 for n in shape) or not 0 <= begin <= end <= data_size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} lies outside the file (offsets {begin}..{end}, "
                f"{data_size} data bytes): the file is truncated or corrupt"
            )
        if (end - begin) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {entry['dtype']}")
        array = mapped[data_start + begin : data_start + end].view(dtype).reshape(shape)
        if as_float32 and entry["dtype"] == "BF16":
            array = bfloat16_bits_to_float32(array)
        elif as_float32 and dtype.kind == "f" and dtype != np.float32:
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
    """Write ``tensors`` as safetensors, streamed to a temporary file renamed when complete.

    Float tensors are stored as float32, weight matrices as ``dtype`` ("float32", "float16" or
    "bfloat16"; see :func:`stored_in_reduced_precision`); other dtypes are kept. The header says
    ``"format": "pt"`` so that Hugging Face transformers loads the file too.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    codes = {v: k for k, v in _DTYPES.items() if k != "BF16"}
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "storage": dtype}}
    arrays: list[np.ndarray] = []
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if array.dtype.kind == "f":
            array, code = array.astype("<f4", copy=False), "F32"
            if dtype != "float32" and stored_in_reduced_precision(name, array):
                if dtype == "float16":
                    array, code = array.astype("<f2"), "F16"
                else:
                    array, code = float32_to_bfloat16_bits(array), "BF16"
        else:
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            code = codes.get(array.dtype)
            if code is None:
                raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        array = np.ascontiguousarray(array)
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keeps the data 8-byte aligned, as the format advises

    def stream(output) -> None:
        output.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for array in arrays:
            output.write(memoryview(array.reshape(-1).view(np.uint8)))

    write_atomic(Path(path), stream)


class WeightsMismatchError(ValueError):
    """A weights file whose tensors do not fit the architecture in config.json."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
        parts = [f"weights in {source} do not match the model configuration:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if names:
                parts.append(f"  {title} ({len(names)}): " + ", ".join(names))
        super().__init__("\n".join(parts))
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
