"""A parallel kernel's band: the work of one thread, compiled once on its own and called by the kernel
through a function pointer.

A Numba function that calls another links the callee's code into its own library (and into each
``prange`` loop's libraries), then optimises and compiles it again there: the whole-group attention band
was compiled five times over in a cold start. The copies also differ. The process's linker resolves the
call to whichever copy it loaded first: the callee's own when this process compiled the kernel, the
caller's when the kernel came from the cache, and those were optimised differently, so a cold and a warm
process gave logits 5e-7 apart. A kernel receives its band as an argument instead, a pointer to the
band's native function, and there is one copy of the band's code, whichever way it was loaded.

Numba's own first-class functions (``types.FunctionType``) do this too, but ask the interpreter for the
address at every launch (~30 us, a few milliseconds per forward); a :class:`Band` argument costs one call
of its ``address`` method, and its type is read from its ``_numba_type_`` in C. A band is declared with its
argument types (a pointer has one signature): inputs it only reads are declared read-only, which callers
passing writable arrays also satisfy.

The pointer is to the band's native function, which returns a status: where a band raised (its only way
to fail is a failed allocation of its working memory), the kernel's call notes it in a process-wide flag
(Numba's C wrapper would print "Exception ignored" and go on, the output left unwritten), and the launch
raises once the kernel is done (``raise_if_a_band_failed``, called by ``threads.launching``).
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import binding, ir
from numba import njit, typeof, types
from numba.core import cgutils, errors
from numba.core.imputils import lower_builtin
from numba.core.typing import Signature
from numba.core.typing.context import Conversion
from numba.extending import NativeValue, models, register_model, unbox

from .simd import FAST

INT = types.int64
FLOAT = types.float32
BOOL = types.boolean


def floats(ndim: int, readonly: bool = False) -> types.Array:
    """A C-contiguous float32 array type (``readonly``: the band only reads it)."""
    return types.Array(types.float32, ndim, "C", readonly=readonly)


def integers(ndim: int, readonly: bool = False) -> types.Array:
    """A C-contiguous int64 array type."""
    return types.Array(types.int64, ndim, "C", readonly=readonly)


def check_arguments(context: Any, given: tuple[types.Type, ...], declared: tuple[types.Type, ...]) -> None:
    """Raises a TypingError unless each given type converts safely to the declared one (a writable array to
    a read-only one, int32 to int64; not float64 to float32, nor a strided array to a contiguous one)."""
    if len(given) != len(declared):
        raise errors.TypingError(f"a band takes {len(declared)} arguments, not {len(given)}")
    for argument, wanted in zip(given, declared, strict=True):
        conversion = context.can_convert(types.unliteral(argument), wanted)
        if conversion is None or conversion > Conversion.safe:
            raise errors.TypingError(f"a band's argument is {wanted}, not {argument}")


# Set by a kernel whose band raised. A C symbol that the kernels' code refers to by name, so that kernels
# loaded from Numba's cache find it in every process.
_FAILED_SYMBOL = "dinat_np_band_failed"
_failed = ctypes.c_int32(0)
binding.add_symbol(_FAILED_SYMBOL, ctypes.addressof(_failed))


def raise_if_a_band_failed() -> None:
    """Raises (and clears the flag) if a band raised inside a kernel since the last call."""
    if _failed.value:
        _failed.value = 0
        raise RuntimeError(
            "a CPU kernel failed in one of its threads (an allocation of its working memory failed: is the "
            "machine out of memory?); its output was not computed"
        )


# ---------------------------------------------------------------------------------------------------------
# A band inside a kernel: a pointer to its native function
# ---------------------------------------------------------------------------------------------------------
class BandType(types.Callable):
    """A band's Numba type: calls take its declared argument types (given ones convert to them safely)."""

    def __init__(self, signature: Signature) -> None:
        self.signature = signature
        # the name says how a kernel calls the band: kernels an earlier dinat-np cached, which called it through
        # its C wrapper, have another signature, and are compiled again rather than loaded
        super().__init__(name=f"native_band{signature}")

    def get_call_type(self, context: Any, args: tuple, kws: dict) -> Signature:
        if kws:
            raise errors.TypingError("a band takes positional arguments only")
        check_arguments(context, args, self.signature.args)
        return Signature(self.signature.return_type, self.signature.args, recvr=self)

    def get_call_signatures(self) -> tuple[list[Signature], bool]:
        return [self.signature], False

    def get_impl_key(self, signature: Signature) -> type:
        return BandType


register_model(BandType)(models.OpaqueModel)  # the native function's address


class Band:
    """A function compiled with the kernels' options for one signature, which kernels call through a pointer.
    Compiled (or loaded from Numba's cache) when a kernel is first launched with it, or by ``compile``."""

    def __init__(self, function: Callable, argument_types: tuple[types.Type, ...]) -> None:
        self.module, self.name = function.__module__, function.__name__
        self.dispatcher = njit(**FAST)(function)
        self._signature = types.void(*argument_types)
        # the type Numba's dispatcher reads at every launch, in C (without it, a call of Python's typeof_pyval: ~5 us)
        self._numba_type_ = BandType(self._signature)
        self._address = 0
        self._entry_points: dict[tuple, Callable] = {}  # by _kinds of the arguments of calls from Python

    def signature(self) -> Signature:
        return self._signature

    def compile(self) -> None:
        # with the whole signature, return type included, as _get_wrapper_address does: Numba's cache keys
        # its entries by what compile() is given, and the argument types alone would make a second entry
        self.dispatcher.compile(self._signature)

    def address(self) -> int:
        """Where its native function is (compiling it first if need be): what a kernel receives."""
        if not self._address:
            self.compile()
            compiled = self.dispatcher.overloads[self._signature.args]
            self._address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
        return self._address

    def __call__(self, *args: Any) -> None:
        """Runs the band on this thread, from Python (work too small for its parallel kernel). The arguments
        are checked as a kernel's call checks them: the compiled entry point would reinterpret others."""
        # Numba's typeof and the check cost ~60 us a call, the band's work as little as ~10 (the few-pixel
        # convolutions' patches): a check is remembered for arguments of the same kinds.
        kinds = _kinds(args)
        entry_point = self._entry_points.get(kinds)
        if entry_point is None:
            check_arguments(self.dispatcher.typingctx, tuple(typeof(a) for a in args), self._signature.args)
            self.compile()
            entry_point = self.dispatcher.overloads[self._signature.args].entry_point
            if kinds is not None and len(self._entry_points) < _MAX_KINDS:
                self._entry_points[kinds] = entry_point
        entry_point(*args)

    def __reduce__(self) -> tuple:
        return _band_named, (self.module, self.name)  # by name: the same object in another process


_MAX_KINDS = 16  # kinds of arguments remembered per band (its callers pass one or two)
_INT64 = range(-(2**63), 2**63)


def _kind(value: Any) -> Any:
    """What Numba's typeof reads of ``value`` (equal kinds, equal types), for the values bands are given:
    arrays, Python and NumPy scalars, tuples of them; None for anything else."""
    kind = type(value)
    if kind is np.ndarray:
        flags = value.flags
        return value.dtype.str, value.ndim, flags.c_contiguous, flags.f_contiguous, flags.writeable, flags.aligned
    if kind is int:
        return kind, value in _INT64  # int64 inside, uint64 or an error outside
    if kind is tuple:
        return _kinds(value)
    if kind in (bool, float) or isinstance(value, (np.number, np.bool_)):
        return kind
    return None


def _kinds(values: tuple) -> tuple | None:
    kinds = tuple(_kind(value) for value in values)
    return None if None in kinds else (tuple, kinds)


def _band_named(module: str, name: str) -> Band:
    return getattr(importlib.import_module(module), name)


def band(*argument_types: types.Type) -> Callable[[Callable], Band]:
    """Declares the decorated function a :class:`Band` taking ``argument_types``."""
    return lambda function: Band(function, argument_types)



@unbox(BandType)
def _unbox_band(band_type: BandType, obj: Any, c: Any) -> NativeValue:
    pointer = cgutils.alloca_once_value(c.builder, c.context.get_constant_null(types.voidptr))
    address = c.pyapi.call_method(obj, "address")
    failed = cgutils.is_null(c.builder, address)
    with c.builder.if_then(c.builder.not_(failed), likely=True):
        c.builder.store(c.pyapi.long_as_voidptr(address), pointer)
        c.pyapi.decref(address)
    return NativeValue(c.builder.load(pointer), is_error=failed)


@lower_builtin(BandType, types.VarArg(types.Any))
def _call_band(context: Any, builder: ir.IRBuilder, signature: Signature, args: list) -> ir.Value:
    # the arguments arrive converted to the declared types; the native function returns a status. A band that
    # raised sets the flag (an exception raised on from a kernel's thread would not reach Python cleanly).
    call_conv = context.call_conv
    function_type = call_conv.get_function_type(signature.return_type, signature.args[1:])
    status, result = call_conv.call_function(builder, builder.bitcast(args[0], function_type.as_pointer()),
                                             signature.return_type, signature.args[1:], args[1:])
    with cgutils.if_unlikely(builder, status.is_error):
        flag = builder.module.globals.get(_FAILED_SYMBOL) or ir.GlobalVariable(builder.module, ir.IntType(32),
                                                                              _FAILED_SYMBOL)
        builder.store_atomic(ir.Constant(ir.IntType(32), 1), flag, "monotonic", 4)
    return result
