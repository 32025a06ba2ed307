"""float32 vectors as one Numba value, for the CPU kernels' innermost loops.

Numba compiles array loops through LLVM's auto-vectoriser, which handles the attention's short,
runtime-length loops (49 neighbours, 32 channels) poorly: remainder loops, accumulators reloaded from
memory, scalar ``floorf`` calls. A vector local is an LLVM ``<LANES x float>`` SSA value, so it lives in
registers, and every operation below is one LLVM vector instruction. ``LANES`` is the width of the
target's registers: 16 on CPUs with AVX-512, 8 elsewhere (one AVX2 register; two SSE or NEON ones).
Wider vectors than the registers were slower: LLVM splits each operation, and the kernels' blocks and
accumulators then need twice the registers there are (see docs/perf-journal.md). Loads and stores
take a lane count and touch only the lanes below it (``llvm.masked.load``/``store``): any length is
handled without a remainder loop and without reading past an array's end. Offsets are in elements
into the array's C-ordered data; callers keep them in bounds (no bounds checks here). Scalar operands
of the arithmetic stand for themselves in every lane.

A block is ``LANES`` vectors as one value (a tuple, also kept in registers): that many rows loaded or
stored at once, transposed (in registers), or summed row by row (``LANES`` dot products finished together).
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model


def _target_features() -> list[str]:
    # the features Numba compiles for: NUMBA_CPU_FEATURES where set, none for a named CPU (e.g. generic),
    # else the host's
    named_cpu = os.environ.get("NUMBA_CPU_NAME", "host") != "host"
    features = os.environ.get("NUMBA_CPU_FEATURES") or ("" if named_cpu else binding.get_host_cpu_features().flatten())
    return features.split(",")


def _has_wide_vectors() -> bool:
    return "+avx512f" in _target_features()


def _has_fma_vectors() -> bool:
    features = _target_features()
    return "+avx2" in features and "+fma" in features


# Whether the target has 512-bit vector registers (AVX-512): the kernels' vector width is chosen by it.
WIDE_VECTORS = _has_wide_vectors()
LANES = 16 if WIDE_VECTORS else 8
# Whether the target is an x86-64 with 256-bit fused multiply-adds (AVX2 and FMA; every AVX-512 CPU has
# them): where the own matrix product (``gemm``) runs.
FMA_VECTORS = _has_fma_vectors()
CACHE_LINE_FLOATS = 16  # 64 bytes

# The kernels' compile options. They let LLVM vectorise reductions and divisions: reassociation and
# contraction of float32 arithmetic, reciprocals, and NumPy's division semantics instead of Python's
# ZeroDivisionError branch. NaN and infinity semantics are kept (softmax starts from -inf).
FAST = dict(cache=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})

_FLOAT = ir.FloatType()
_VECTOR = ir.VectorType(_FLOAT, LANES)
_I32 = ir.IntType(32)


class Float32Vector(types.Type):
    def __init__(self) -> None:
        super().__init__(name=f"float32x{LANES}")


float32_vector = Float32Vector()


@register_model(Float32Vector)
class _Float32VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _broadcast(builder, value, vector_type):
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, 0)] * LANES)
    return builder.shuffle_vector(first, first, zeros)


def _lane_mask(builder, lanes):
    # lane k is active when k < lanes (lanes may be <= 0: none, or > LANES: all)
    lanes = builder.select(builder.icmp_signed(">", lanes, ir.Constant(lanes.type, LANES)),
                           ir.Constant(lanes.type, LANES), lanes)
    index = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, k) for k in range(LANES)])
    return builder.icmp_signed("<", index, _broadcast(builder, builder.trunc(lanes, _I32), ir.VectorType(_I32, LANES)))


def _address(context, builder, array_type, array, offset):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), _VECTOR.as_pointer())


def _llvm_intrinsic(builder, name, return_type, argument_types):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, argument_types), name)


def _masked_load(builder, address, mask):
    function = _llvm_intrinsic(builder, f"llvm.masked.load.v{LANES}f32.p0", _VECTOR,
                               [_VECTOR.as_pointer(), _I32, ir.VectorType(ir.IntType(1), LANES), _VECTOR])
    return builder.call(function, [address, ir.Constant(_I32, 4), mask, ir.Constant(_VECTOR, None)])


def _masked_store(builder, value, address, mask):
    function = _llvm_intrinsic(builder, f"llvm.masked.store.v{LANES}f32.p0", ir.VoidType(),
                               [_VECTOR, _VECTOR.as_pointer(), _I32, ir.VectorType(ir.IntType(1), LANES)])
    builder.call(function, [value, address, ir.Constant(_I32, 4), mask])


# A whole vector is read or written by a plain instruction, a part by a masked one: AVX2's masked loads
# and stores (vmaskmovps) are slow on AMD's CPUs, and the lane count is known only at run time.
def _load_lanes(builder, address, lanes):
    whole = builder.icmp_signed(">=", lanes, ir.Constant(lanes.type, LANES))
    with builder.if_else(whole, likely=True) as (then, otherwise):
        with then:
            plain = builder.load(address, align=4)
            plain_block = builder.basic_block
        with otherwise:
            masked = _masked_load(builder, address, _lane_mask(builder, lanes))
            masked_block = builder.basic_block
    value = builder.phi(_VECTOR)
    value.add_incoming(plain, plain_block)
    value.add_incoming(masked, masked_block)
    return value


def _store_lanes(builder, value, address, lanes):
    whole = builder.icmp_signed(">=", lanes, ir.Constant(lanes.type, LANES))
    with builder.if_else(whole, likely=True) as (then, otherwise):
        with then:
            builder.store(value, address, align=4)
        with otherwise:
            _masked_store(builder, value, address, _lane_mask(builder, lanes))


@intrinsic
def load(typingctx, array, offset, lanes):
    """``array.flat[offset:offset + lanes]`` in the first ``lanes`` lanes (at most LANES), zeros in the rest."""

    def codegen(context, builder, signature, args):
        address = _address(context, builder, signature.args[0], args[0], args[1])
        return _load_lanes(builder, address, args[2])

    return float32_vector(array, offset, lanes), codegen


@intrinsic
def store(typingctx, array, offset, lanes, value):
    """Write the first ``lanes`` lanes of ``value`` to ``array.flat[offset:offset + lanes]``."""

    def codegen(context, builder, signature, args):
        address = _address(context, builder, signature.args[0], args[0], args[1])
        _store_lanes(builder, args[3], address, args[2])
        return context.get_dummy_value()

    return types.none(array, offset, lanes, value), codegen


@intrinsic
def broadcast(typingctx, array, offset):
    """``array.flat[offset]`` in every lane."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return _broadcast(builder, builder.load(builder.gep(data, [args[1]])), _VECTOR)

    return float32_vector(array, offset), codegen


@intrinsic
def prefetch(typingctx, array, offset):
    """Ask for the cache line of ``array.flat[offset]`` in L1, ahead of its use (no fault if it is outside)."""

    def codegen(context, builder, signature, args):
        byte_pointer = ir.IntType(8).as_pointer()
        address = builder.bitcast(_address(context, builder, signature.args[0], args[0], args[1]), byte_pointer)
        function = _llvm_intrinsic(builder, "llvm.prefetch.p0", ir.VoidType(), [byte_pointer, _I32, _I32, _I32])
        # a read (0), kept close (locality 3), of data (1)
        builder.call(function, [address, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(array, offset), codegen


@intrinsic
def splat(typingctx, x):
    """The scalar ``x`` (as float32) in every lane."""

    def codegen(context, builder, signature, args):
        return _broadcast(builder, context.cast(builder, args[0], signature.args[0], types.float32), _VECTOR)

    return float32_vector(x), codegen


def _lane_wise(name, operation, arity, doc):
    # An intrinsic on float32_vector values in which scalar operands stand for themselves in every lane;
    # operation(builder, values) gets every operand as a <LANES x float>.
    def codegen(context, builder, signature, args):
        values = []
        for operand_type, value in zip(signature.args, args, strict=True):
            if operand_type != float32_vector:
                value = _broadcast(builder, context.cast(builder, value, operand_type, types.float32), _VECTOR)
            values.append(value)
        return operation(builder, values)

    def signature(operands):
        scalar = (types.Float, types.Integer)
        if float32_vector not in operands or not all(o == float32_vector or isinstance(o, scalar) for o in operands):
            return None
        return float32_vector(*operands), codegen

    if arity == 1:
        def typer(typingctx, a):
            return signature((a,))
    elif arity == 2:
        def typer(typingctx, a, b):
            return signature((a, b))
    else:
        def typer(typingctx, a, b, c):
            return signature((a, b, c))

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


def _llvm_vector_function(name, arity):
    # a call of llvm.<name>.v<LANES>f32
    def operation(builder, values):
        return builder.call(_llvm_intrinsic(builder, f"llvm.{name}.v{LANES}f32", _VECTOR, [_VECTOR] * arity), values)

    return operation


def _power_of_two(builder, values):
    integers = ir.VectorType(_I32, LANES)
    biased = builder.add(builder.fptosi(values[0], integers), _broadcast(builder, ir.Constant(_I32, 127), integers))
    return builder.bitcast(builder.shl(biased, _broadcast(builder, ir.Constant(_I32, 23), integers)), _VECTOR)


add = _lane_wise("add", lambda builder, v: builder.fadd(*v), 2, "``a + b`` lane by lane.")
subtract = _lane_wise("subtract", lambda builder, v: builder.fsub(*v), 2, "``a - b`` lane by lane.")
multiply = _lane_wise("multiply", lambda builder, v: builder.fmul(*v), 2, "``a * b`` lane by lane.")
divide = _lane_wise("divide", lambda builder, v: builder.fdiv(*v), 2, "``a / b`` lane by lane.")
# maxnum: LLVM's plain fcmp+select form of max is not turned into one vector instruction without nnan
maximum = _lane_wise("maximum", _llvm_vector_function("maxnum", 2), 2, "The larger of ``a`` and ``b`` lane by lane.")
fma = _lane_wise("fma", _llvm_vector_function("fma", 3), 3, "``a * b + c`` lane by lane, one rounding.")
floor = _lane_wise("floor", _llvm_vector_function("floor", 1), 1, "The largest integer not above each lane.")
power_of_two = _lane_wise("power_of_two", _power_of_two, 1,
                          "``2 ** n`` for lanes holding integers in [-126, 127], built from the exponent bits.")


@intrinsic
def lane_sum(typingctx, a):
    """The sum of the lanes (in any order)."""

    def codegen(context, builder, signature, args):
        reduce_add = _llvm_intrinsic(builder, f"llvm.vector.reduce.fadd.v{LANES}f32", _FLOAT, [_FLOAT, _VECTOR])
        return builder.call(reduce_add, [ir.Constant(_FLOAT, -0.0), args[0]], fastmath=("reassoc",))

    return types.float32(a), codegen


# Blocks: LANES vectors as one value (a tuple, kept in registers).
_BLOCK_TYPE = types.UniTuple(float32_vector, LANES)
_HALVINGS = tuple(LANES >> k for k in range(1, LANES.bit_length()))  # LANES / 2, ..., 2, 1


def _rows(builder, block):
    return [builder.extract_value(block, row) for row in range(LANES)]


def _block(context, builder, rows):
    return context.make_tuple(builder, _BLOCK_TYPE, rows)


def _row_lanes(builder, row, rows, lanes):
    # the lanes a block's row reads or writes: ``lanes`` for the rows below ``rows``, none past them
    inside = builder.icmp_signed("<", ir.Constant(rows.type, row), rows)
    return builder.select(inside, lanes, ir.Constant(lanes.type, 0))


def _row_addresses(context, builder, signature, args):
    # array.flat[row_offsets[first + j] + offset] for the LANES rows j (row_offsets read only for the rows < rows)
    array_type, offsets_type = signature.args[0], signature.args[1]
    array, row_offsets, first, offset, rows = args[:5]
    offsets_data = context.make_array(offsets_type)(context, builder, row_offsets).data
    addresses = []
    for row in range(LANES):
        # rows past `rows` point at the array's start: their masked accesses touch nothing
        inside = builder.icmp_signed("<", ir.Constant(rows.type, row), rows)
        index = builder.select(inside, builder.add(first, ir.Constant(first.type, row)), first)
        row_offset = builder.load(builder.gep(offsets_data, [index]))
        at = builder.select(inside, builder.add(row_offset, offset), ir.Constant(offset.type, 0))
        addresses.append(_address(context, builder, array_type, array, at))
    return addresses


@intrinsic
def load_rows(typingctx, array, row_offsets, first, offset, rows, lanes):
    """LANES vectors: row ``j < rows`` is ``load(array, row_offsets[first + j] + offset, lanes)``, the rest zero.
    (An index into ``row_offsets``, not a slice of it: a slice in a kernel's loop costs reference counting.)"""

    def codegen(context, builder, signature, args):
        loaded = [_load_lanes(builder, address, _row_lanes(builder, row, args[4], args[5]))
                  for row, address in enumerate(_row_addresses(context, builder, signature, args))]
        return _block(context, builder, loaded)

    return _BLOCK_TYPE(array, row_offsets, first, offset, rows, lanes), codegen


@intrinsic
def store_rows(typingctx, array, row_offsets, first, offset, rows, lanes, block):
    """``store(array, row_offsets[first + j] + offset, lanes, block[j])`` for the rows ``j < rows``."""

    def codegen(context, builder, signature, args):
        addresses = _row_addresses(context, builder, signature, args)
        for row, (value, address) in enumerate(zip(_rows(builder, args[6]), addresses, strict=True)):
            _store_lanes(builder, value, address, _row_lanes(builder, row, args[4], args[5]))
        return context.get_dummy_value()

    return types.none(array, row_offsets, first, offset, rows, lanes, block), codegen


@intrinsic
def fma_rows(typingctx, block, multiplier, addend):
    """``block[j] * multiplier + addend`` for every row ``j``; ``addend`` is a vector, or a block added row
    by row."""

    def codegen(context, builder, signature, args):
        fma_vector = _llvm_intrinsic(builder, f"llvm.fma.v{LANES}f32", _VECTOR, [_VECTOR] * 3)
        addends = _rows(builder, args[2]) if signature.args[2] == _BLOCK_TYPE else [args[2]] * LANES
        rows = [builder.call(fma_vector, [row, args[1], total])
                for row, total in zip(_rows(builder, args[0]), addends, strict=True)]
        return _block(context, builder, rows)

    return _BLOCK_TYPE(block, multiplier, addend), codegen


@intrinsic
def transpose(typingctx, block):
    """The LANES x LANES transpose: lane ``k`` of row ``j`` becomes lane ``j`` of row ``k``."""

    def codegen(context, builder, signature, args):
        rows = _rows(builder, args[0])
        # log2(LANES) butterfly stages; stage `bit` swaps that bit of the row index with that bit of the lane index
        for bit in _HALVINGS[::-1]:
            low_mask = ir.Constant(ir.VectorType(_I32, LANES),
                                   [k if not k & bit else LANES + k - bit for k in range(LANES)])
            high_mask = ir.Constant(ir.VectorType(_I32, LANES),
                                    [k + bit if not k & bit else LANES + k for k in range(LANES)])
            for low in range(LANES):
                if low & bit:
                    continue
                high = low | bit
                rows[low], rows[high] = (builder.shuffle_vector(rows[low], rows[high], low_mask),
                                         builder.shuffle_vector(rows[low], rows[high], high_mask))
        return _block(context, builder, rows)

    return _BLOCK_TYPE(block), codegen


@intrinsic
def zeros(typingctx):
    """A block of zeros."""

    def codegen(context, builder, signature, args):
        return _block(context, builder, [ir.Constant(_VECTOR, None)] * LANES)

    return _BLOCK_TYPE(), codegen


@intrinsic
def row_sums(typingctx, block):
    """Lane ``j`` holds the sum of row ``j``'s lanes: LANES dot products finished at once."""

    def codegen(context, builder, signature, args):
        rows = _rows(builder, args[0])
        # halving stages: rows r and r + width exchange lane blocks so that each keeps half of both, summed
        for width in _HALVINGS:
            low_mask, high_mask = [], []
            for start in range(0, LANES, 2 * width):
                low_mask += [start + k for k in range(width)] + [LANES + start + k for k in range(width)]
                high_mask += [start + width + k for k in range(width)]
                high_mask += [LANES + start + width + k for k in range(width)]
            low_mask = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, k) for k in low_mask])
            high_mask = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, k) for k in high_mask])
            rows = [builder.fadd(builder.shuffle_vector(rows[r], rows[r + width], low_mask),
                                 builder.shuffle_vector(rows[r], rows[r + width], high_mask)) for r in range(width)]
        return rows[0]

    return float32_vector(block), codegen


@intrinsic
def largest_lane(typingctx, a):
    """The largest of the lanes."""

    def codegen(context, builder, signature, args):
        # a tree of lane-wise maxima over halves: llvm.vector.reduce.fmax is a serial chain without nnan
        maxnum = _llvm_intrinsic(builder, f"llvm.maxnum.v{LANES}f32", _VECTOR, [_VECTOR] * 2)
        value = args[0]
        for width in _HALVINGS:
            upper = ir.Constant(ir.VectorType(_I32, LANES),
                                [ir.Constant(_I32, (k + width) % LANES) for k in range(LANES)])
            value = builder.call(maxnum, [value, builder.shuffle_vector(value, value, upper)])
        return builder.extract_element(value, ir.Constant(_I32, 0))

    return types.float32(a), codegen


@njit(**FAST)
def scratch(size):
    """``size`` uninitialised float32 starting on a 64-byte boundary (a cache line): vector loads from
    it never straddle two lines. (NumPy's arrays start on 16-byte boundaries, Numba's on 32-byte ones.)"""
    buffer = np.empty(size + CACHE_LINE_FLOATS, np.float32)
    first = -(buffer.ctypes.data // 4) % CACHE_LINE_FLOATS
    return buffer[first : first + size]
