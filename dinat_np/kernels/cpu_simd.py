"""Sixteen float32 lanes as one Numba value, for the CPU kernels' innermost loops.

Numba compiles array loops through LLVM's auto-vectoriser, which handles the attention's short,
runtime-length loops (49 neighbours, 32 channels) poorly: remainder loops, accumulators reloaded from
memory, scalar ``floorf`` calls. A ``float32x16`` local is an LLVM ``<16 x float>`` SSA value, so it
lives in registers, and every operation below is one LLVM vector instruction (LLVM splits it into two
or four on CPUs with 256- or 128-bit vectors). Loads and stores take a lane count and touch only the
lanes below it (``llvm.masked.load``/``store``): any length is handled without a remainder loop and
without reading past an array's end. Offsets are in elements into the array's C-ordered data; callers
keep them in bounds (no bounds checks here).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_FLOAT = ir.FloatType()
_VECTOR = ir.VectorType(_FLOAT, LANES)
_I32 = ir.IntType(32)


class Float32x16(types.Type):
    def __init__(self) -> None:
        super().__init__(name="float32x16")


float32x16 = Float32x16()


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _broadcast(builder, value, vector_type):
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, 0)] * LANES)
    return builder.shuffle_vector(first, first, zeros)


def _lane_mask(builder, lanes):
    # lane k is active when k < lanes (lanes may be <= 0: none, or > 16: all)
    lanes = builder.select(builder.icmp_signed(">", lanes, ir.Constant(lanes.type, LANES)),
                           ir.Constant(lanes.type, LANES), lanes)
    index = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, k) for k in range(LANES)])
    return builder.icmp_signed("<", index, _broadcast(builder, builder.trunc(lanes, _I32), ir.VectorType(_I32, LANES)))


def _float32(builder, value):
    return value if value.type == _FLOAT else builder.fptrunc(value, _FLOAT)


def _address(context, builder, array_type, array, offset):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), _VECTOR.as_pointer())


def _llvm_intrinsic(builder, name, return_type, argument_types):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, argument_types), name)


@intrinsic
def load(typingctx, array, offset, lanes):
    """``array.flat[offset:offset + lanes]`` in the first ``lanes`` lanes (at most 16), zeros in the rest."""

    def codegen(context, builder, signature, args):
        address = _address(context, builder, signature.args[0], args[0], args[1])
        masked_load = _llvm_intrinsic(builder, "llvm.masked.load.v16f32.p0", _VECTOR,
                                      [_VECTOR.as_pointer(), _I32, ir.VectorType(ir.IntType(1), LANES), _VECTOR])
        return builder.call(masked_load, [address, ir.Constant(_I32, 4), _lane_mask(builder, args[2]),
                                          ir.Constant(_VECTOR, None)])

    return float32x16(array, offset, lanes), codegen


@intrinsic
def store(typingctx, array, offset, lanes, value):
    """Write the first ``lanes`` lanes of ``value`` to ``array.flat[offset:offset + lanes]``."""

    def codegen(context, builder, signature, args):
        address = _address(context, builder, signature.args[0], args[0], args[1])
        masked_store = _llvm_intrinsic(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                                       [_VECTOR, _VECTOR.as_pointer(), _I32, ir.VectorType(ir.IntType(1), LANES)])
        builder.call(masked_store, [args[3], address, ir.Constant(_I32, 4), _lane_mask(builder, args[2])])
        return context.get_dummy_value()

    return types.none(array, offset, lanes, value), codegen


@intrinsic
def splat(typingctx, x):
    """The scalar ``x`` (as float32) in every lane."""

    def codegen(context, builder, signature, args):
        return _broadcast(builder, _float32(builder, args[0]), _VECTOR)

    return float32x16(x), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` lane by lane, one rounding."""

    def codegen(context, builder, signature, args):
        return builder.call(_llvm_intrinsic(builder, "llvm.fma.v16f32", _VECTOR, [_VECTOR] * 3), args)

    return float32x16(a, b, c), codegen


@intrinsic
def add(typingctx, a, b):
    """``a + b`` lane by lane."""

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return float32x16(a, b), codegen


@intrinsic
def multiply(typingctx, a, b):
    """``a * b`` lane by lane."""

    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1])

    return float32x16(a, b), codegen


@intrinsic
def largest_lane(typingctx, a, lanes):
    """The largest of the first ``lanes`` lanes of ``a`` (-inf when ``lanes`` <= 0)."""

    def codegen(context, builder, signature, args):
        minus_infinity = _broadcast(builder, ir.Constant(_FLOAT, float("-inf")), _VECTOR)
        kept = builder.select(_lane_mask(builder, args[1]), args[0], minus_infinity)
        return builder.call(_llvm_intrinsic(builder, "llvm.vector.reduce.fmax.v16f32", _FLOAT, [_VECTOR]), [kept])

    return types.float32(a, lanes), codegen
