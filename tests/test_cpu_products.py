"""The CPU products: the kernels' own product, NumPy's OpenBLAS called from inside the kernels, and the
NumPy fallback."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from numba import njit, prange

from dinat_np.kernels import cpu
from dinat_np.kernels.common import Conv, Linear, Norm
from dinat_np.kernels.cpu import blas, gemm, simd
from dinat_np.kernels.cpu import conv as cpu_conv
from dinat_np.kernels.cpu import products as cpu_products
from dinat_np.kernels.cpu.band import INT, band, floats
from dinat_np.kernels.cpu.simd import FAST, scratch
from dinat_np.kernels.cpu.threads import launching


def reference(x, weight_t, bias=None, scale=None, residual=None):
    y = x.astype(np.float64).reshape(-1, x.shape[-1]) @ weight_t.astype(np.float64)
    if bias is not None:
        y += bias
    if residual is not None:
        y = residual.reshape(y.shape) + scale * y
    return y


# Few rows: the threads split the columns, then apply the epilogue; many rows: each thread a band of rows.
@pytest.mark.parametrize("rows, columns", [(1, 40), (2, 40), (3, 1), (57, 40), (1000, 40), (1000, 1)])
def test_every_epilogue_equals_float64_reference(products, rows, columns):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 48), dtype=np.float32)
    weight_t = rng.standard_normal((48, columns), dtype=np.float32) * np.float32(48**-0.5)
    bias, scale = rng.standard_normal(columns, dtype=np.float32), rng.standard_normal(columns, dtype=np.float32)
    residual = rng.standard_normal((rows, columns), dtype=np.float32)

    np.testing.assert_allclose(cpu.linear(x, Linear(weight_t)), reference(x, weight_t), rtol=0, atol=2e-5)
    np.testing.assert_allclose(cpu.linear(x, Linear(weight_t, bias), "relu"),
                               np.maximum(reference(x, weight_t, bias), 0), rtol=0, atol=2e-5)
    np.testing.assert_allclose(closed_residual(x, weight_t, bias, scale, residual),
                               reference(x, weight_t, bias, scale, residual), rtol=0, atol=2e-5)


def closed_residual(x, weight_t, bias, scale, residual):
    """The residual epilogue alone: :func:`cpu.linear_residual` without a norm."""
    out, normed = cpu.linear_residual(x, Linear(weight_t, bias), scale, residual)
    assert normed is None
    return out


def test_non_contiguous_operands_are_read_correctly(products):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 30), dtype=np.float32).T  # (30, 40), Fortran order
    weight = rng.standard_normal((24, 40), dtype=np.float32)  # PyTorch's (out, in): weight.T is a view
    residual = rng.standard_normal((24, 30), dtype=np.float32).T
    bias, scale = np.ones(24, np.float32), np.full(24, 0.5, np.float32)
    np.testing.assert_allclose(cpu.linear(x, Linear(weight.T)), reference(x, weight.T), rtol=0, atol=2e-5)
    np.testing.assert_allclose(closed_residual(x, weight.T, bias, scale, residual),
                               reference(x, weight.T, bias, scale, residual), rtol=0, atol=2e-5)


def mlp_reference(x, fc1_t, fc1_bias, activation, fc2_t, fc2_bias, scale, residual):
    hidden = reference(x, fc1_t, fc1_bias)
    if activation == "gelu":
        hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    else:
        hidden = np.maximum(hidden, 0)
    return residual + scale * (hidden @ fc2_t.astype(np.float64) + fc2_bias)


# 2 threads: below 256 rows the two products split columns; above, each thread takes its rows through
# both products in blocks of _MLP_BLOCK_ROWS (here 64, so that 300 rows give several and a remainder).
@pytest.mark.parametrize("rows", [3, 255, 256, 300])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_mlp_equals_float64_reference(products, monkeypatch, rows, activation):
    monkeypatch.setattr(cpu_products, "_MLP_BLOCK_ROWS", 64)
    rng = np.random.default_rng(rows)
    dim, hidden = 24, 96
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    fc1_t = rng.standard_normal((dim, hidden), dtype=np.float32) * np.float32(dim**-0.5)
    fc2_t = rng.standard_normal((hidden, dim), dtype=np.float32) * np.float32(hidden**-0.5)
    fc1_bias, fc2_bias, scale, norm_weight, norm_bias = (rng.standard_normal(n, dtype=np.float32)
                                                         for n in (hidden, dim, dim, dim, dim))
    residual = rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(3) + np.float32(1.5)
    mlp = (x, fc1_t, fc1_bias, activation, fc2_t, fc2_bias, scale, residual)
    expected = mlp_reference(*mlp)
    mean = expected.mean(axis=-1, keepdims=True)
    expected_normed = (expected - mean) / np.sqrt(expected.var(axis=-1, keepdims=True) + 1e-5) * norm_weight + norm_bias

    layers = (x, Linear(fc1_t, fc1_bias), activation, Linear(fc2_t, fc2_bias), scale, residual)
    out, none = cpu.mlp_residual(*layers)
    out_again, normed = cpu.mlp_residual(*layers, norm=Norm(norm_weight, norm_bias, 1e-5))

    assert none is None
    assert out.dtype == normed.dtype == np.float32 and out.shape == normed.shape == residual.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=3e-5)
    np.testing.assert_array_equal(out_again, out)
    np.testing.assert_allclose(normed, expected_normed, rtol=0, atol=2e-5)


def test_layers_without_bias_are_products_alone(products):
    # 300 rows: the MLP's blocked kernel where the products run inside the kernels
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 24), dtype=np.float32)
    fc1_t = rng.standard_normal((24, 96), dtype=np.float32) * np.float32(24**-0.5)
    fc2_t = rng.standard_normal((96, 24), dtype=np.float32) * np.float32(96**-0.5)
    scale, residual = rng.standard_normal(24, dtype=np.float32), rng.standard_normal((300, 24), dtype=np.float32)
    out, _ = cpu.mlp_residual(x, Linear(fc1_t), "relu", Linear(fc2_t), scale, residual)
    expected = mlp_reference(x, fc1_t, 0.0, "relu", fc2_t, 0.0, scale, residual)
    np.testing.assert_allclose(out, expected, rtol=0, atol=3e-5)
    out, _ = cpu.linear_residual(x, Linear(fc2_t[:24]), scale, residual)
    np.testing.assert_allclose(out, reference(x, fc2_t[:24], None, scale, residual), rtol=0, atol=2e-5)


def test_mlp_refuses_an_unknown_activation():
    x = np.ones((4, 8), np.float32)
    layer = Linear(np.ones((8, 8), np.float32), np.ones(8, np.float32))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        cpu.mlp_residual(x, layer, "swish", layer, np.ones(8, np.float32), x)


def conv_reference(x, weight_cols, bias):
    """3x3, stride 2, zero padding 1, channels-last, in float64: nine shifted products (``weight_cols`` as
    ``cpu.conv_weight`` gives it: packed for the own product where it runs)."""
    weight_cols = cpu.download(weight_cols)
    batch, height, width, channels = x.shape
    out_height, out_width = (height + 1) // 2, (width + 1) // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 2), (1, 2), (0, 0)))
    y = np.zeros((batch, out_height, out_width, weight_cols.shape[1]))
    for di in range(3):
        for dj in range(3):
            patch = padded[:, di:di + 2 * out_height:2, dj:dj + 2 * out_width:2]
            y += patch @ weight_cols[(di * 3 + dj) * channels:(di * 3 + dj + 1) * channels].astype(np.float64)
    return y if bias is None else y + bias


# Over _DIRECT_MAX_CHANNELS input channels, with 2 threads: below 256 output pixels all patches are
# gathered, then one product splits the columns; above, each thread gathers and multiplies blocks of
# _CONV_BLOCK_ROWS pixels (here 64: several, and a remainder). Up to it, the direct kernel: four pixels of
# a row at a time (widths leaving 1-3 over), one or two vectors of output channels (6, 16, 20, 40).
@pytest.mark.parametrize("shape, out_channels", [
    ((1, 7, 9, 5), 6), ((1, 31, 32, 3), 40), ((2, 33, 30, 8), 16), ((3, 20, 21, 4), 20), ((1, 2, 3, 16), 6),
    ((2, 9, 11, 17), 6), ((1, 40, 38, 20), 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv3x3_stride2_equals_float64_reference(products, monkeypatch, shape, out_channels, with_bias):
    monkeypatch.setattr(cpu_conv, "_CONV_BLOCK_ROWS", 64)
    rng = np.random.default_rng(shape[1])
    x = rng.standard_normal(shape, dtype=np.float32)
    weight = rng.standard_normal((out_channels, shape[3], 3, 3), dtype=np.float32)  # PyTorch's (out, in, 3, 3)
    weight_cols = cpu.conv_weight(weight)
    bias = rng.standard_normal(out_channels, dtype=np.float32) if with_bias else None
    y = cpu.conv3x3_stride2(x, Conv(weight_cols, bias))
    assert y.dtype == np.float32 and y.shape == (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, out_channels)
    np.testing.assert_allclose(y, conv_reference(x, weight_cols, bias), rtol=0, atol=3e-5)


@pytest.mark.parametrize("channels", [3, 20])  # the direct kernel and im2col
def test_conv3x3_stride2_reads_channels_first_pixels_and_other_layouts(products, channels):
    rng = np.random.default_rng(channels)
    pixels = rng.standard_normal((2, channels, 13, 10), dtype=np.float32)  # NCHW, as the model gets them
    weight_cols = cpu.conv_weight(rng.standard_normal((8, channels, 3, 3), dtype=np.float32))
    bias = rng.standard_normal(8, dtype=np.float32)
    expected = conv_reference(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)), weight_cols, bias)
    view = cpu.nchw_to_nhwc(pixels)
    assert np.shares_memory(view, pixels)  # no layout pass
    for x in (view, pixels.astype(np.float64).transpose(0, 2, 3, 1), np.asfortranarray(view)):
        np.testing.assert_allclose(cpu.conv3x3_stride2(x, Conv(weight_cols, bias)), expected, rtol=0, atol=3e-5)


def test_float64_inputs_are_computed_in_float32(products):
    rng = np.random.default_rng(6)
    x, weight_t = rng.standard_normal((9, 16)), rng.standard_normal((16, 8))
    y = cpu.linear(x, Linear(weight_t))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x @ weight_t, rtol=0, atol=1e-4)


@pytest.mark.skipif(cpu_products._BLAS is None, reason="NumPy's bundled OpenBLAS is not available here")
def test_openblas_thread_count_is_restored_after_each_launch(monkeypatch):
    monkeypatch.setattr(cpu_products, "_PRODUCTS", "openblas")
    openblas = cpu_products._BLAS
    original = openblas.set_num_threads(3)
    try:
        cpu.linear(np.ones((64, 8), np.float32), Linear(np.ones((8, 8), np.float32)))
        assert openblas.set_num_threads(original) == 3  # what it held after the launch: the value set before
    finally:
        openblas.set_num_threads(original)


@pytest.mark.skipif(cpu_products._BLAS is None, reason="NumPy's bundled OpenBLAS is not available here")
def test_concurrent_callers_get_their_own_results_and_the_thread_count_survives(monkeypatch):
    monkeypatch.setattr(cpu_products, "_PRODUCTS", "openblas")
    openblas = cpu_products._BLAS
    original = openblas.set_num_threads(2)
    rng = np.random.default_rng(7)
    cases = [(rng.standard_normal((300, 32), dtype=np.float32), rng.standard_normal((32, 24), dtype=np.float32))
             for _ in range(4)]
    errors: list[float] = []

    def work(x: np.ndarray, weight_t: np.ndarray) -> None:
        for _ in range(25):
            errors.append(float(np.abs(cpu.linear(x, Linear(weight_t)) - reference(x, weight_t)).max()))

    threads = [threading.Thread(target=work, args=case) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(errors) == 100 and max(errors) < 2e-5
        assert openblas.set_num_threads(original) == 2
    finally:
        openblas.set_num_threads(original)


def test_numpy_products_can_be_asked_for(monkeypatch):
    monkeypatch.setenv("DINAT_NP_NUMPY_BLAS", "1")
    assert blas.find_blas() is None
    monkeypatch.setenv("DINAT_NP_NUMPY_BLAS", "0")
    assert (blas.find_blas() is None) == (blas.NUMPY_OPENBLAS is None)


def test_product_kernel_is_cached_on_disk(tmp_path):
    """The sgemm pointer is an argument, not a constant baked into the code, so Numba can cache the kernel."""
    script = ("import numpy as np\nfrom dinat_np.kernels import cpu\nfrom dinat_np.kernels.common import Conv, Linear\n"
              "x, w, v = np.ones((600, 8), np.float32), np.ones((8, 8), np.float32), np.ones(8, np.float32)\n"
              "cpu.linear(x[:4], Linear(w, v), 'gelu')\n"
              "cpu.mlp_residual(x, Linear(w, v), 'gelu', Linear(w, v), v, x)\n"
              "cpu.conv3x3_stride2(np.ones((1, 40, 40, 3), np.float32), Conv(np.ones((27, 8), np.float32)))\n"
              "cpu.conv3x3_stride2(np.ones((1, 40, 40, 20), np.float32), Conv(np.ones((180, 8), np.float32)))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    completed = subprocess.run([sys.executable, "-W", "error::numba.NumbaWarning", "-c", script], env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    cached = [path.name for path in Path(tmp_path).rglob("*.nbi")]
    assert any(name.startswith("products._linear-") for name in cached)
    if gemm.PRODUCTS == "own":  # the own product too: a C function, cached like the kernels
        assert any(name.startswith("gemm._sgemm-") for name in cached)
    if gemm.PRODUCTS != "numpy":
        assert any(name.startswith("products._mlp-") for name in cached)
        assert any(name.startswith("conv._conv3x3_s2-") for name in cached)


def test_whole_model_agrees_on_every_product_path(monkeypatch):
    from dinat_np import DinatConfig, DinatForImageClassification

    config = DinatConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], dilations=[[1, 2], [1, 1]], kernel_size=3,
                         num_labels=5)
    model = DinatForImageClassification(config, seed=3)
    pixels = np.random.default_rng(8).standard_normal((2, 3, 40, 36)).astype(np.float32)
    monkeypatch.setattr(cpu_products, "_PRODUCTS", "numpy")
    through_numpy = model(pixels).logits
    assert np.abs(through_numpy).max() > 1e-3  # a real comparison, not of zeros
    for path in ("own", "openblas") if cpu_products._BLAS is not None else ("own",):
        monkeypatch.setattr(cpu_products, "_PRODUCTS", path)
        np.testing.assert_allclose(model(pixels).logits, through_numpy, rtol=0, atol=1e-5, err_msg=path)


# Tiles of 6 rows x 64 columns (16 with AVX2), panels 128 deep (256), chunks of rows: shapes with remainders
# of each, and products written into a part of a larger output (the MLP's blocks, the few-row column split).
@pytest.mark.parametrize("rows, depth, columns", [(1, 1, 1), (5, 3, 17), (6, 64, 64), (13, 129, 65), (50, 300, 200),
                                                  (700, 16, 48), (9, 1536, 40), (4, 0, 9), (7, 257, 70)])
def test_own_sgemm_equals_float64_reference(rows, depth, columns):
    rng = np.random.default_rng(depth)
    x = rng.standard_normal((rows + 3, depth), dtype=np.float32)
    weight = gemm.pack(rng.standard_normal((depth, columns), dtype=np.float32))
    y = np.full((rows + 5, columns + 20), 7.0, np.float32)
    gemm.sgemm()(blas.ROW_MAJOR, blas.NO_TRANS, blas.NO_TRANS, rows, columns, depth, 1.0,
                 x.ctypes.data + 3 * depth * 4, depth, weight.panels.ctypes.data, gemm.TILE_COLUMNS, 0.0,
                 y.ctypes.data + (5 * (columns + 20) + 20) * 4, columns + 20)
    expected = x[3:].astype(np.float64) @ weight.matrix().astype(np.float64)
    np.testing.assert_allclose(y[5:, 20:], expected, rtol=0, atol=1e-5 * max(depth, 1) ** 0.5)
    assert (y[:5] == 7.0).all() and (y[:, :20] == 7.0).all()  # nothing written outside its rows and columns


@pytest.mark.parametrize("depth, columns", [(1, 1), (3, 17), (64, 64), (129, 200), (0, 9)])
def test_a_packed_weight_gives_back_its_matrix(depth, columns):
    matrix = np.random.default_rng(columns).standard_normal((depth, columns), dtype=np.float32)
    weight = gemm.pack(matrix)
    assert weight.shape == (depth, columns) and weight.panels.shape[1] == gemm.TILE_COLUMNS
    assert weight.panels.ctypes.data % 64 == 0  # the panels' rows start on cache lines
    assert np.array_equal(weight.matrix(), matrix) and np.array_equal(cpu.download(weight), matrix)


def test_op_outputs_start_on_cache_lines(products):
    # the kernels' 16-lane loads of q/k/v rows must not straddle cache lines (see cpu.layout.aligned_empty)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((50, 32), dtype=np.float32)
    weight_t = rng.standard_normal((32, 96), dtype=np.float32)
    qkv = cpu.linear(x, Linear(weight_t))
    rpb = rng.standard_normal((2, 5, 5), dtype=np.float32)
    context, _ = cpu.neighborhood_attention(qkv.reshape(1, 5, 10, 3, 2, 16), rpb, 3, 1, 0.25)
    norm = Norm(np.ones(32, np.float32), np.zeros(32, np.float32), 1e-5)
    closed = cpu.linear_residual(x, Linear(weight_t[:, :32]), norm.weight, x, norm=norm)
    convolved = cpu.conv3x3_stride2(x.reshape(1, 5, 10, 32), Conv(rng.standard_normal((288, 8), dtype=np.float32)))
    for output in (qkv, context, cpu.layer_norm(x, norm), *closed, convolved):
        assert output.ctypes.data % 64 == 0 and output.flags.c_contiguous


def test_products_run_where_they_are_fastest(monkeypatch):
    """Own product on x86-64 with AVX2 and FMA (or AVX-512), else NumPy's OpenBLAS from the kernels, else
    NumPy's matmul; DINAT_NP_NUMPY_BLAS=1 asks for NumPy's matmul whatever the CPU."""
    monkeypatch.delenv("DINAT_NP_NUMPY_BLAS", raising=False)
    blas = object()
    for fma_vectors, openblas, expected in ((True, blas, "own"), (True, None, "own"), (False, blas, "openblas"),
                                            (False, None, "numpy")):
        monkeypatch.setattr(gemm, "FMA_VECTORS", fma_vectors)
        monkeypatch.setattr(gemm, "NUMPY_OPENBLAS", openblas)
        assert gemm._products() == expected
    monkeypatch.setenv("DINAT_NP_NUMPY_BLAS", "1")
    assert gemm._products() == "numpy"


def test_vector_widths_follow_the_features_numba_compiles_for(monkeypatch):
    for features, wide, fma_vectors in (("+avx2,+fma,-avx512f", False, True), ("+avx2,+avx512f,+fma", True, True),
                                        ("+avx,-avx2,-fma", False, False), ("+neon,+fp-armv8", False, False)):
        monkeypatch.setenv("NUMBA_CPU_FEATURES", features)
        assert (simd._has_wide_vectors(), simd._has_fma_vectors()) == (wide, fma_vectors), features
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")  # a named CPU without features: none
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "")
    assert not simd._has_fma_vectors()


def test_own_sgemm_is_compiled_once_and_kept_alive():
    """Every caller gets the same C function, which stays valid after a garbage collection (its code lives
    as long as the compiled object that gemm keeps)."""
    import gc

    first = gemm.sgemm()
    gc.collect()
    assert gemm.sgemm() is first
    x, weight = np.ones((7, 3), np.float32), gemm.pack(np.full((3, 5), 2.0, np.float32))
    y = np.zeros((7, 5), np.float32)
    first(blas.ROW_MAJOR, blas.NO_TRANS, blas.NO_TRANS, 7, 5, 3, 1.0, x.ctypes.data, 3,
          weight.panels.ctypes.data, gemm.TILE_COLUMNS, 0.0, y.ctypes.data, 5)
    assert (y == 6.0).all()


def test_a_linear_takes_float64_and_strided_operands_as_float32() -> None:
    # the epilogue band takes C-contiguous float32: the op converts what it is given
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 6), dtype=np.float32)
    weight_t = rng.standard_normal((6, 4), dtype=np.float32)
    bias = rng.standard_normal(8, dtype=np.float32)[::2]  # strided
    expected = cpu.linear(x, Linear(weight_t, bias.copy()), "gelu")
    np.testing.assert_array_equal(cpu.linear(x, Linear(weight_t, bias), "gelu"), expected)
    np.testing.assert_array_equal(cpu.linear(x, Linear(weight_t, bias.astype(np.float64)), "gelu"), expected)


def test_a_band_run_from_python_refuses_arguments_it_would_misread() -> None:
    from numba.core.errors import TypingError

    x = np.arange(24, dtype=np.float32)
    cols = np.empty((1, 9 * 3), np.float32)
    shape, strides = (1, 2, 2, 3), (12, 6, 3, 1)
    cpu_conv._im2col_rows(x[:12], shape, strides, 0, 1, cols, 0)  # the declared types: runs
    assert cols[0, 4 * 3:5 * 3].tolist() == [0.0, 1.0, 2.0]  # the patch's centre is pixel (0, 0)
    for wrong in (x[::2], x[:12].astype(np.float64)):  # strided, float64: refused, not reinterpreted
        for _ in range(2):  # a refusal is not remembered as a check passed
            with pytest.raises(TypingError):
                cpu_conv._im2col_rows(wrong, shape, strides, 0, 1, cols, 0)
    with pytest.raises(TypingError):  # past int64: Numba would type it uint64
        cpu_conv._im2col_rows(x[:12], shape, strides, 0, 2**63, cols, 0)
    read_only = x[:12].copy()
    read_only.flags.writeable = False
    cols[:] = np.nan
    cpu_conv._im2col_rows(read_only, shape, strides, 0, 1, cols, 0)  # the band only reads it: runs
    assert cols[0, 4 * 3:5 * 3].tolist() == [0.0, 1.0, 2.0]
    read_only_cols = cols.copy()
    read_only_cols.flags.writeable = False
    with pytest.raises(TypingError):  # but it writes the patches
        cpu_conv._im2col_rows(x[:12], shape, strides, 0, 1, read_only_cols, 0)


@band(floats(1), INT)
def _allocating_band(out, floats_wanted):
    out[0] = scratch(floats_wanted).size


@njit(parallel=True, **FAST)
def _allocating_kernel(allocating_band, out, floats_wanted):
    for part in prange(out.size):
        allocating_band(out[part:part + 1], floats_wanted[part])


def test_a_band_that_fails_on_any_thread_makes_its_launch_raise() -> None:
    """A failed allocation inside a band raises once the kernel is done, whichever of its tasks failed, and
    the next launch runs; Numba's C wrapper used to print "Exception ignored" and leave the output unwritten."""
    out = np.zeros(2, np.float32)
    too_many = 2**60  # floats: 4 EiB
    with launching():
        _allocating_kernel(_allocating_band, out, np.array([3, 4]))
    assert out.tolist() == [3.0, 4.0]
    for floats_wanted in ([3, too_many], [too_many, 4], [too_many, too_many]):
        with pytest.raises(RuntimeError, match="out of memory"), launching():
            _allocating_kernel(_allocating_band, out, np.array(floats_wanted))
    with launching():
        _allocating_kernel(_allocating_band, out, np.array([5, 6]))
    assert out.tolist() == [5.0, 6.0]
    with pytest.raises(MemoryError):  # run from Python, the band raises as any function does
        _allocating_band(out, too_many)
