"""Torch-free, code-free reader for checkpoints written by ``torch.save``.

Since PyTorch 1.6, ``torch.save`` writes a zip archive::

    <archive>/data.pkl        the pickled object tree (state dict, wrapper dict, ...)
    <archive>/data/<key>      raw bytes of each storage, referenced from data.pkl
    <archive>/byteorder       "little" or "big" (absent in old files: little)

Tensors appear in ``data.pkl`` as calls to ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` whose storage is a *persistent id* tuple
``("storage", torch.FloatStorage, key, location, numel)``.

A pickle can name and call any importable function (``os.system``, ``builtins.eval``, ...),
so this module never lets the standard unpickler import anything.  Every global a pickle
names is checked against a small allow-list *before any opcode runs* (a static scan of the
opcode stream), and again while loading; each allowed name is bound to a harmless function of
this module that only builds NumPy arrays.  Nothing in a checkpoint can execute code.

The stand-ins are shared by every load, so none of them can be modified by a pickle (no instance
dict, attribute writes and ``BUILD`` refused): one crafted file cannot change how later files load.

bfloat16: NumPy has no bfloat16 type; bf16 tensors are decoded to float32 (exact: every bf16 value
is a float32 value).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from .state_dict import bfloat16_bits_to_float32
from .torch_archive import ArchiveReader, TorchCheckpointError, describe_non_zip, is_torch_zip

__all__ = [
    "TorchCheckpointError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "load_torch_checkpoint",
    "extract_state_dict",
    "scan_pickle_globals",
    "ALLOWED_GLOBALS",
]


class UnsafeCheckpointError(TorchCheckpointError):
    """The checkpoint's pickle references a global outside the allow-list (it could run code)."""


# ---------------------------------------------------------------------------------------------
# dtypes

# torch storage class name -> (numpy dtype, is_bfloat16)
_STORAGE_DTYPES: dict[str, tuple[np.dtype, bool]] = {
    "FloatStorage": (np.dtype(np.float32), False),
    "DoubleStorage": (np.dtype(np.float64), False),
    "HalfStorage": (np.dtype(np.float16), False),
    "BFloat16Storage": (np.dtype(np.uint16), True),
    "LongStorage": (np.dtype(np.int64), False),
    "IntStorage": (np.dtype(np.int32), False),
    "ShortStorage": (np.dtype(np.int16), False),
    "CharStorage": (np.dtype(np.int8), False),
    "ByteStorage": (np.dtype(np.uint8), False),
    "BoolStorage": (np.dtype(np.bool_), False),
    "ComplexFloatStorage": (np.dtype(np.complex64), False),
    "ComplexDoubleStorage": (np.dtype(np.complex128), False),
    # Untyped storages hold bytes; the tensor's dtype then comes from _rebuild_tensor_v3.
    "UntypedStorage": (np.dtype(np.uint8), False),
}

# torch dtype object name (pickled as GLOBAL 'torch <name>') -> (numpy dtype, is_bfloat16)
_TORCH_DTYPES: dict[str, tuple[np.dtype, bool]] = {
    "float32": (np.dtype(np.float32), False),
    "float": (np.dtype(np.float32), False),
    "float64": (np.dtype(np.float64), False),
    "double": (np.dtype(np.float64), False),
    "float16": (np.dtype(np.float16), False),
    "half": (np.dtype(np.float16), False),
    "bfloat16": (np.dtype(np.uint16), True),
    "int64": (np.dtype(np.int64), False),
    "long": (np.dtype(np.int64), False),
    "int32": (np.dtype(np.int32), False),
    "int": (np.dtype(np.int32), False),
    "int16": (np.dtype(np.int16), False),
    "short": (np.dtype(np.int16), False),
    "int8": (np.dtype(np.int8), False),
    "uint8": (np.dtype(np.uint8), False),
    "uint16": (np.dtype(np.uint16), False),
    "uint32": (np.dtype(np.uint32), False),
    "uint64": (np.dtype(np.uint64), False),
    "bool": (np.dtype(np.bool_), False),
    "complex64": (np.dtype(np.complex64), False),
    "complex128": (np.dtype(np.complex128), False),
}


# ---------------------------------------------------------------------------------------------
# Harmless stand-ins for the allow-listed globals.  None of them imports or calls anything
# that the pickle could choose; they only slice NumPy buffers.


class _Sealed:
    """Base of the stand-ins: no instance dict, and neither ``setattr`` nor ``BUILD`` can change one.

    The stand-ins are module-level objects shared by every load.  Were they writable, a pickle could
    ``BUILD`` new attribute values into one (say ``is_bf16`` of ``torch.FloatStorage``) and silently
    corrupt every later load in the process.  ``BUILD`` calls ``__setstate__`` when it exists, so
    defining it here (to refuse) also keeps the pickle off the slot-``setattr`` path.
    """

    __slots__ = ()

    def _init(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tries to set attribute {name!r} of {self!r}; refused")

    def __delattr__(self, name: str) -> None:
        raise UnsafeCheckpointError(f"the pickle tries to delete attribute {name!r} of {self!r}; refused")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tries to modify {self!r} (BUILD); refused")


class _StorageType(_Sealed):
    """Marker standing in for ``torch.FloatStorage`` & co. (never callable)."""

    __slots__ = ("name", "dtype", "is_bf16")

    def __init__(self, name: str):
        dtype, is_bf16 = _STORAGE_DTYPES[name]
        self._init(name=name, dtype=dtype, is_bf16=is_bf16)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(f"the pickle tries to call torch.{self.name}; only tensor data is supported")

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _TorchDType(_Sealed):
    """Marker standing in for a ``torch.<dtype>`` object."""

    __slots__ = ("name", "dtype", "is_bf16")

    def __init__(self, name: str):
        dtype, is_bf16 = _TORCH_DTYPES[name]
        self._init(name=name, dtype=dtype, is_bf16=is_bf16)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(f"the pickle tries to call torch.{self.name}")

    def __repr__(self) -> str:
        return f"<torch dtype {self.name}>"


class _TensorTypeMarker(_Sealed):
    """Marker for ``torch.Tensor`` / ``torch.nn.Parameter`` used as a type argument only."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self._init(name=name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(f"the pickle tries to construct {self.name} directly; unsupported")

    def __repr__(self) -> str:
        return f"<type {self.name}>"


class _Function(_Sealed):
    """An allow-listed function as the pickle sees it.

    A plain function object is writable (``__dict__``, ``__defaults__``, ...); this sealed wrapper
    is what the unpickler hands out instead, so a ``BUILD`` on it is refused.
    """

    __slots__ = ("name", "func")

    def __init__(self, name: str, func: Callable[..., Any]):
        self._init(name=name, func=func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<function {self.name}>"


class _Storage(_Sealed):
    """A storage referenced by key; its bytes are read from the archive on first use."""

    __slots__ = ("reader", "key", "stype", "numel", "_array")

    def __init__(self, reader: ArchiveReader, key: str, stype: _StorageType, numel: int):
        self._init(reader=reader, key=key, stype=stype, numel=numel, _array=None)

    def __repr__(self) -> str:
        return f"<storage {self.key}>"

    def array(self) -> np.ndarray:
        if self._array is None:
            object.__setattr__(self, "_array", self.reader.read_storage(self.key, self.stype.dtype, self.numel))
        return self._array


# The two allow-listed classes are handed out as the classes themselves.  A BUILD on the class
# object (rather than on an instance made by this load) cannot change it: BUILD then calls the
# plain function ``cls.__setstate__(state)``, which fails for the missing argument before doing
# anything.


class _OrderedDict(collections.OrderedDict):
    """``collections.OrderedDict`` that also accepts BUILD state (``_metadata`` of state dicts)."""

    def __setstate__(self, state: Any) -> None:
        # torch stores the module-version metadata as an attribute; keep it, ignore anything else.
        if isinstance(state, dict) and "_metadata" in state:
            self._metadata = state["_metadata"]


class _Inert:
    """Stand-in for plain record classes (``argparse.Namespace``) in training checkpoints."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.__dict__.update({k: v for k, v in kwargs.items() if isinstance(k, str)})

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TorchCheckpointError(f"malformed tensor record: {what} is {value!r}")
    return tuple(int(v) for v in value)


def _view(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None,
          is_bf16: bool | None = None) -> np.ndarray:
    """Build the (possibly strided, offset) tensor view of a storage as a NumPy array."""
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(f"malformed tensor record: storage is {type(storage).__name__}")
    if not isinstance(offset, int) or offset < 0:
        raise TorchCheckpointError(f"malformed tensor record: storage offset {offset!r}")
    size_t = _as_int_tuple(size, "size")
    stride_t = _as_int_tuple(stride, "stride")
    if len(size_t) != len(stride_t) or any(s < 0 for s in size_t) or any(s < 0 for s in stride_t):
        raise TorchCheckpointError(f"malformed tensor record: size {size_t} / stride {stride_t}")

    base = storage.array()
    bf16 = storage.stype.is_bf16
    if dtype is not None:
        # _rebuild_tensor_v3: the storage is untyped bytes and the tensor dtype is explicit.
        nbytes = base.size * base.itemsize
        if nbytes % dtype.itemsize:
            raise TorchCheckpointError(f"storage {storage.key}: {nbytes} bytes is not a whole number of {dtype}")
        base = base.view(np.uint8).view(dtype)
        bf16 = bool(is_bf16)

    numel = math.prod(size_t)  # Python ints: a crafted size cannot overflow into a small number
    # Counted whether or not it is a copy: whoever uses the tensor may copy it.
    storage.reader.reserve(numel * (4 if bf16 else base.itemsize), f"tensor of shape {size_t}")
    if numel == 0:
        out = np.zeros(size_t, dtype=base.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size_t, stride_t, strict=True))
        if last >= base.size:
            raise TorchCheckpointError(
                f"{storage.reader.path}: tensor view out of bounds: storage {storage.key} has {base.size} elements, "
                f"view needs index {last} (offset {offset}, size {size_t}, stride {stride_t})"
            )
        contiguous = tuple(math.prod(size_t[i + 1:]) for i in range(len(size_t)))
        if stride_t == contiguous or numel == 1:
            out = base[offset:offset + numel].reshape(size_t)
        else:
            item = base.itemsize
            out = np.lib.stride_tricks.as_strided(
                base[offset:], shape=size_t, strides=tuple(s * item for s in stride_t), writeable=False
            ).copy()
    if bf16:
        out = bfloat16_bits_to_float32(out)
    return out


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
    return _view(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    return _view(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> np.ndarray:
    if not isinstance(dtype, _TorchDType):
        raise TorchCheckpointError(f"malformed tensor record: dtype {dtype!r}")
    return _view(storage, storage_offset, size, stride, dtype=dtype.dtype, is_bf16=dtype.is_bf16)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    return data


_REBUILDERS: tuple[Callable[..., Any], ...] = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
                                               _rebuild_parameter, _rebuild_parameter_with_state)


def _is_rebuilder(func: Any) -> bool:
    return isinstance(func, _Function) and any(func.func is r for r in _REBUILDERS)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Only our own rebuild functions (already resolved through the allow-list) may be applied.
    if not _is_rebuilder(func) or not isinstance(new_type, _TensorTypeMarker):
        raise UnsafeCheckpointError("the pickle applies _rebuild_from_type_v2 to something other than a tensor")
    if not isinstance(args, tuple):
        raise TorchCheckpointError("malformed tensor record in _rebuild_from_type_v2")
    return func(*args)


def _torch_size(*args: Any) -> tuple:
    return tuple(args[0]) if args else ()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch", "Tensor"): _TensorTypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TensorTypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorTypeMarker("torch.nn.Parameter"),
    ("argparse", "Namespace"): _Inert,
}
for _module, _func in (
    ("torch._utils", _rebuild_tensor),
    ("torch._utils", _rebuild_tensor_v2),
    ("torch._utils", _rebuild_tensor_v3),
    ("torch._utils", _rebuild_parameter),
    ("torch._utils", _rebuild_parameter_with_state),
    ("torch._tensor", _rebuild_from_type_v2),
):
    _ALLOWED[(_module, _func.__name__)] = _Function(f"{_module}.{_func.__name__}", _func)
_ALLOWED[("torch", "Size")] = _Function("torch.Size", _torch_size)
del _module, _func
for _name in _STORAGE_DTYPES:
    _ALLOWED[("torch", _name)] = _StorageType(_name)
_ALLOWED[("torch.storage", "UntypedStorage")] = _ALLOWED[("torch", "UntypedStorage")]
for _name in _TORCH_DTYPES:
    _ALLOWED[("torch", _name)] = _TorchDType(_name)
del _name

ALLOWED_GLOBALS: tuple[str, ...] = tuple(sorted(f"{m}.{n}" for m, n in _ALLOWED))


def _refuse(module: str, name: str, where: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {where}: its pickle references the global '{module}.{name}', which is not "
        "one of the tensor-rebuilding functions this reader allows (a checkpoint must never run code). "
        "Nothing from the file was executed."
    )


# ---------------------------------------------------------------------------------------------
# Static scan: every global, before anything is unpickled.

_STRING_OPS = {
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
    "SHORT_BINSTRING", "BINSTRING", "STRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}
_NO_STACK_CHANGE = {"PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"}
_FORBIDDEN_OPS = {"EXT1", "EXT2", "EXT4"}  # copyreg extension registry: indirect globals
# A state dict's pickle holds about fifteen opcodes per tensor; the limit bounds the objects that
# unpickling a crafted one could create.
_MAX_PICKLE_OPS = 2_000_000


def scan_pickle_globals(data: bytes, where: str = "the checkpoint") -> list[tuple[str, str]]:
    """List every global a pickle references, refusing any that is not allow-listed.

    Walks the opcode stream without executing it.  ``STACK_GLOBAL`` takes module and name from
    the stack; they must be string constants pushed (directly or through the memo) just before,
    otherwise the name cannot be verified and the pickle is refused.

    Raises:
        UnsafeCheckpointError: a global outside the allow-list, or an unverifiable global.
        TorchCheckpointError: the opcode stream is malformed.
    """
    found: list[tuple[str, str]] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values of the most recent stack pushes (None = not a string)
    not_str = object()
    try:
        for count, (op, arg, _pos) in enumerate(pickletools.genops(data)):
            if count == _MAX_PICKLE_OPS:
                raise TorchCheckpointError(f"{where}: data.pkl has more than {_MAX_PICKLE_OPS:,} opcodes; "
                                           "a checkpoint's object tree is far smaller")
            name = op.name
            if name in _FORBIDDEN_OPS:
                raise UnsafeCheckpointError(f"refusing to load {where}: its pickle uses the {name} opcode "
                                            "(globals through the copyreg extension registry)")
            if name == "GLOBAL" or name == "INST":
                module, _, qual = str(arg).partition(" ")
                if (module, qual) not in _ALLOWED:
                    raise _refuse(module, qual, where)
                found.append((module, qual))
                recent.append(not_str)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or not isinstance(recent[-1], str) or not isinstance(recent[-2], str):
                    raise UnsafeCheckpointError(
                        f"refusing to load {where}: its pickle computes a global's name at load time, "
                        "which cannot be verified before loading"
                    )
                module, qual = recent[-2], recent[-1]
                if (module, qual) not in _ALLOWED:
                    raise _refuse(module, qual, where)
                found.append((module, qual))
                del recent[-2:]
                recent.append(not_str)
            elif name in _STRING_OPS:
                value = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                recent.append(value)
            elif name == "MEMOIZE":
                # The unpickler's rule: the next index is the memo's size, counting entries PUT set.
                memo[len(memo)] = recent[-1] if recent else not_str
            elif name in _MEMO_PUT:
                memo[int(arg)] = recent[-1] if recent else not_str
            elif name in _MEMO_GET:
                recent.append(memo.get(int(arg), not_str))
            elif name not in _NO_STACK_CHANGE:
                recent.append(not_str)
            if len(recent) > 64:
                del recent[:-8]
    except TorchCheckpointError:
        raise
    except Exception as exc:  # pickletools raises ValueError etc. on garbage
        raise TorchCheckpointError(f"{where}: data.pkl is not a valid pickle ({exc})") from None
    return found


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals are the stand-ins in ``_ALLOWED``."""

    def __init__(self, data: bytes, reader: ArchiveReader):
        super().__init__(io.BytesIO(data))
        self.reader = reader
        self.storages: dict[str, _Storage] = {}  # by key: views of one storage share its array

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _refuse(module, name, str(self.reader.path)) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchCheckpointError(f"{self.reader.path}: unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TorchCheckpointError(f"{self.reader.path}: unknown storage type {stype!r:.80}")
        key = str(key)
        if not key or "/" in key or "\\" in key or key in (".", ".."):
            raise TorchCheckpointError(f"{self.reader.path}: bad storage key {key!r}")
        if not isinstance(numel, int) or numel < 0:
            raise TorchCheckpointError(f"{self.reader.path}: bad storage size {numel!r}")
        existing = self.storages.get(key)
        if existing is not None:
            if existing.stype is not stype:
                raise TorchCheckpointError(f"{self.reader.path}: storage {key} is used with two different types")
            return existing
        storage = self.storages[key] = _Storage(self.reader, key, stype, numel)
        return storage


def load_torch_file(path: str | os.PathLike) -> Any:
    """Load the object tree of a ``torch.save`` zip file with tensors as NumPy arrays.

    Args:
        path: the checkpoint file.

    Returns:
        What was saved, with every tensor replaced by a NumPy array (float32/float16/float64/
        int64/... as stored; bfloat16 decoded exactly to float32), ``OrderedDict`` for ordered dicts.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list, or tries to
            modify one of the stand-ins.
        TorchCheckpointError: not a torch zip archive (legacy format, truncated, garbage, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise TorchCheckpointError(f"{path}: no such file")
    if not is_torch_zip(path):
        raise TorchCheckpointError(describe_non_zip(path))
    with ArchiveReader(path) as reader:
        data = reader.data_pkl()
        scan_pickle_globals(data, where=str(path))  # refuses before a single opcode is executed
        try:
            return _RestrictedUnpickler(data, reader).load()
        except TorchCheckpointError:
            raise
        except Exception as exc:
            raise TorchCheckpointError(
                f"{path}: data.pkl cannot be unpickled ({type(exc).__name__}: {exc})"
            ) from None


_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")


def extract_state_dict(obj: Any, *, key: str | None = None, where: str = "checkpoint") -> dict[str, np.ndarray]:
    """Find the state dict inside a loaded checkpoint and strip DataParallel ``module.`` prefixes.

    A checkpoint is either a state dict itself or a dict wrapping one under ``"model"``,
    ``"state_dict"`` or ``"state_dict_ema"`` (tried in that order unless ``key`` names one).
    Non-array entries of the state dict are dropped.
    """
    if not isinstance(obj, dict):
        raise TorchCheckpointError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise TorchCheckpointError(f"{where}: has no entry {key!r} (entries: {sorted(map(str, obj))[:20]})")
        obj = obj[key]
    elif not any(isinstance(v, np.ndarray) for v in obj.values()):
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
        else:
            raise TorchCheckpointError(
                f"{where}: no tensors found at the top level nor under any of {list(_WRAPPER_KEYS)} "
                f"(entries: {sorted(map(str, obj))[:20]})"
            )
    if not isinstance(obj, dict):
        raise TorchCheckpointError(f"{where}: entry is {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            continue
        while name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise TorchCheckpointError(f"{where}: tensor {name!r} appears twice (with and without 'module.')")
        out[name] = value
    if not out:
        raise TorchCheckpointError(f"{where}: contains no tensors")
    return out


def load_torch_checkpoint(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """Read a ``torch.save`` checkpoint into ``{name: np.ndarray}`` without torch and without running code.

    Unwraps ``{"model": ...}``, ``{"state_dict": ...}``, ``{"state_dict_ema": ...}`` and strips
    ``module.`` prefixes (see :func:`extract_state_dict`).  bfloat16 tensors come back as float32
    (exact).

    Args:
        path: the ``.pth`` / ``.bin`` file.
        key: take the state dict from this entry of a wrapper dict.

    Returns:
        The state dict.
    """
    return extract_state_dict(load_torch_file(path), key=key, where=str(path))
