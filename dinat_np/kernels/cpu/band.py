"""A parallel kernel's band: the work of one thread, compiled once on its own and called by the kernel
through a function pointer.

A Numba function that calls another links the callee's code into its own library (and into each
``prange`` loop's libraries), then optimises and compiles it again there: the whole-group attention band
was compiled five times over in a cold start. The copies also differ. The process's linker resolves the
call to whichever copy it loaded first: the callee's own when this process compiled the kernel, the
caller's when the kernel came from the cache, and those were optimised differently, so a cold and a warm
process gave logits 5e-7 apart. A kernel receives its band as an argument instead, a pointer to the
band's C entry point, and there is one copy of the band's code, whichever way it was loaded.

Numba's own first-class functions (``types.FunctionType``) do this too, but ask the interpreter for the
address at every launch (~30 us, a few milliseconds per forward); a :class:`Band` argument costs one call
of its ``address`` method. A band is declared with its argument types (a pointer has one signature):
inputs it only reads are declared read-only, which callers passing writable arrays also satisfy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from llvmlite import ir
from numba import njit, typeof, types
from numba.core import cgutils, errors
from numba.core.imputils import lower_builtin
from numba.core.typing import Signature
from numba.core.typing.context import Conversion
from numba.experimental.function_type import _get_wrapper_address
from numba.extending import NativeValue, models, register_model, typeof_impl, unbox

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


# ---------------------------------------------------------------------------------------------------------
# A band inside a kernel: a pointer to a C function of its declared signature
# ---------------------------------------------------------------------------------------------------------
class BandType(types.Callable):
    """A band's Numba type: calls take its declared argument types (given ones convert to them safely)."""

    def __init__(self, signature: Signature) -> None:
        self.signature = signature
        super().__init__(name=f"band{signature}")

    def get_call_type(self, context: Any, args: tuple, kws: dict) -> Signature:
        if kws:
            raise errors.TypingError("a band takes positional arguments only")
        check_arguments(context, args, self.signature.args)
        return Signature(self.signature.return_type, self.signature.args, recvr=self)

    def get_call_signatures(self) -> tuple[list[Signature], bool]:
        return [self.signature], False

    def get_impl_key(self, signature: Signature) -> type:
        return BandType


register_model(BandType)(models.OpaqueModel)  # the C entry point's address


class Band:
    """A function compiled with the kernels' options for one signature, which kernels call through a pointer.
    Compiled (or loaded from Numba's cache) when a kernel is first launched with it, or by ``compile``."""

    def __init__(self, function: Callable, argument_types: tuple[types.Type, ...]) -> None:
        self.module, self.name = function.__module__, function.__name__
        self.dispatcher = njit(**FAST)(function)
        self._signature = types.void(*argument_types)
        self.numba_type = BandType(self._signature)  # typeof asks at every launch
        self._address = 0

    def signature(self) -> Signature:
        return self._signature

    def compile(self) -> None:
        # with the whole signature, return type included, as _get_wrapper_address does: Numba's cache keys
        # its entries by what compile() is given, and the argument types alone would make a second entry
        self.dispatcher.compile(self._signature)

    def address(self) -> int:
        """Where its C entry point is (compiling it first if need be): what a kernel receives."""
        if not self._address:
            self.compile()
            self._address = _get_wrapper_address(self.dispatcher, self._signature)
        return self._address

    def __call__(self, *args: Any) -> None:
        """Runs the band on this thread, from Python (work too small for its parallel kernel). The arguments
        are checked as a kernel's call checks them: the compiled entry point would reinterpret others."""
        check_arguments(self.dispatcher.typingctx, tuple(typeof(a) for a in args), self._signature.args)
        self.compile()
        self.dispatcher.overloads[self._signature.args].entry_point(*args)

    def __reduce__(self) -> tuple:
        return _band_named, (self.module, self.name)  # by name: the same object in another process


def _band_named(module: str, name: str) -> Band:
    return getattr(importlib.import_module(module), name)


def band(*argument_types: types.Type) -> Callable[[Callable], Band]:
    """Declares the decorated function a :class:`Band` taking ``argument_types``."""
    return lambda function: Band(function, argument_types)



@typeof_impl.register(Band)
def _typeof_band(value: Band, context: Any) -> BandType:
    return value.numba_type


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
    # the arguments arrive converted to the declared types; the C entry point takes their LLVM values
    function_type = ir.FunctionType(context.get_value_type(signature.return_type),
                                    [context.get_value_type(t) for t in signature.args[1:]])
    return builder.call(builder.bitcast(args[0], function_type.as_pointer()), args[1:])
