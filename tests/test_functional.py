"""dinat_np.functional against NATTEN 0.17.5's own CPU kernels (tests/data/na_cases.npz)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinat_np import functional
from dinat_np.kernels import cpu
from dinat_np.kernels.common import Linear, Norm
from dinat_np.kernels.cpu.attention import window_starts

from tests.helpers import DATA

CASES = json.loads((DATA / "manifest.json").read_text())["na_cases"]


@pytest.fixture(scope="module")
def na_cases():
    return np.load(DATA / "na_cases.npz")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c['case']}-k{c['kernel_size']}-d{c['dilation']}")
def test_ops_equal_natten(na_cases, case):
    i, k, d = case["case"], case["kernel_size"], case["dilation"]
    q, key, v, rpb = (na_cases[f"case{i}_{name}"] for name in ("q", "k", "v", "rpb"))
    logits = functional.na2d_qk(q, key, k, d, rpb=rpb)
    np.testing.assert_allclose(logits, na_cases[f"case{i}_logits"], rtol=0, atol=1e-5)
    out = functional.na2d_av(softmax(na_cases[f"case{i}_logits"]), v, k, d)
    np.testing.assert_allclose(out, na_cases[f"case{i}_out"], rtol=0, atol=1e-5)
    # The fused op with scale 1 is the same computation in one pass.
    fused = functional.na2d(q, key, v, k, d, rpb=rpb, scale=1.0)
    np.testing.assert_allclose(fused, na_cases[f"case{i}_out"], rtol=0, atol=1e-5)


def test_fused_scale_and_no_rpb_match_unfused():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 11, 13, 8)).astype(np.float32) for _ in range(3))
    logits = functional.na2d_qk(q * 8**-0.5, k, 3, 2)
    expected = functional.na2d_av(softmax(logits), v, 3, 2)
    np.testing.assert_allclose(functional.na2d(q, k, v, 3, 2), expected, atol=1e-5)


@pytest.mark.parametrize(
    "height, width, heads, head_dim, kernel_size, dilation, padded",
    [(9, 11, 2, 8, 3, 1, False), (13, 12, 3, 5, 3, 3, False), (11, 14, 1, 16, 5, 2, False),
     (7, 7, 4, 32, 7, 1, False), (10, 9, 2, 6, 3, 3, True)],
)
def test_fused_qkv_bias_equals_biased_input(height, width, heads, head_dim, kernel_size, dilation, padded):
    # The kernel folds the q/k/v product's bias in (b_k dropped, b_v added to the output): it must give
    # what the biased q/k/v give, probabilities included.
    rng = np.random.default_rng(kernel_size * 10 + dilation)
    qkv = rng.standard_normal((2, height, width, 3, heads, head_dim)).astype(np.float32)
    if padded:  # the bottom-right of the map zero-padded before the product, as DinatLayer pads
        qkv[:, height - 2:] = 0.0
        qkv[:, :, width - 3:] = 0.0
    qkv_bias = rng.standard_normal(3 * heads * head_dim).astype(np.float32)
    rpb = rng.standard_normal((heads, 2 * kernel_size - 1, 2 * kernel_size - 1)).astype(np.float32)
    scale = head_dim**-0.5
    biased = qkv + qkv_bias.reshape(3, heads, head_dim)

    out, attn = cpu.neighborhood_attention(qkv, rpb, kernel_size, dilation, scale, True, qkv_bias=qkv_bias)
    expected_out, expected_attn = cpu.neighborhood_attention(biased, rpb, kernel_size, dilation, scale, True)
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(attn, expected_attn, rtol=0, atol=1e-5)
    # and the reference-precision unfused ops on the biased q/k/v agree
    q, k, v = (np.ascontiguousarray(biased[:, :, :, n]) for n in range(3))
    logits = cpu.na_qk(q * np.float32(scale), k, rpb, kernel_size, dilation)
    np.testing.assert_allclose(attn, softmax(logits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, cpu.na_av(softmax(logits), v, kernel_size, dilation), rtol=0, atol=1e-5)
    # without attention output, the same context
    alone, none = cpu.neighborhood_attention(qkv, rpb, kernel_size, dilation, scale, qkv_bias=qkv_bias)
    assert none is None
    np.testing.assert_allclose(alone, out, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "batch, heads, head_dim, kernel_size, dilation, height, width, with_bias",
    [(2, 16, 32, 7, 1, 7, 7, True), (1, 2, 32, 7, 8, 56, 56, True), (2, 3, 20, 3, 2, 6, 6, False),
     (1, 2, 40, 5, 3, 15, 15, True), (2, 1, 8, 9, 1, 9, 9, True), (1, 4, 16, 3, 1, 3, 3, False),
     (1, 1, 24, 17, 1, 17, 17, True), (2, 2, 32, 7, 1, 20, 23, True), (1, 3, 20, 5, 2, 17, 19, False),
     (1, 1, 8, 17, 1, 19, 20, True), (1, 2, 48, 3, 4, 14, 13, True), (2, 2, 8, 1, 3, 3, 3, True),
     (1, 2, 32, 7, 2, 20, 14, True)],
)
def test_fused_attention_equals_float64_reference(batch, heads, head_dim, kernel_size, dilation, height, width,
                                                  with_bias):
    # Both CPU kernels: maps exactly kernel_size x dilation across (the dense per-group kernel) and
    # sliding windows clamped at the borders; head sizes that are not multiples of 16 (masked lanes),
    # windows of 9 to 289 keys (kernel sizes above 16: bias rows longer than a vector); sliding windows on a
    # map exactly kernel_size x dilation wide but taller (20 x 14: every window spans its whole column class).
    rng = np.random.default_rng(height * 100 + width + head_dim)
    qkv = rng.standard_normal((batch, height, width, 3, heads, head_dim)).astype(np.float32)
    qkv_bias = rng.standard_normal(3 * heads * head_dim).astype(np.float32) if with_bias else None
    rpb = rng.standard_normal((heads, 2 * kernel_size - 1, 2 * kernel_size - 1)).astype(np.float32)
    scale = head_dim**-0.5
    out, attn = cpu.neighborhood_attention(qkv[:, ::-1], rpb, kernel_size, dilation, scale, True, qkv_bias=qkv_bias)

    biased = qkv[:, ::-1].astype(np.float64) + (0.0 if qkv_bias is None else qkv_bias.reshape(3, heads, head_dim))
    q, k, v = (np.ascontiguousarray(biased[:, :, :, n]) for n in range(3))
    expected_attn = softmax(cpu.na_qk(q * scale, k, rpb.astype(np.float64), kernel_size, dilation))
    expected_out = cpu.na_av(expected_attn, v, kernel_size, dilation)
    np.testing.assert_allclose(attn, expected_attn, rtol=0, atol=2e-6)
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=1e-5)


def test_fused_qkv_bias_of_wrong_shape_is_a_clear_error():
    qkv = np.random.default_rng(4).standard_normal((1, 5, 5, 3, 2, 4)).astype(np.float32)
    rpb = np.ones((2, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"qkv_bias must have shape \(24,\)"):
        cpu.neighborhood_attention(qkv, rpb, 3, 1, 0.5, qkv_bias=np.ones(8, np.float32))


def test_window_rule_keeps_windows_inside_and_centred():
    # Every window lies inside the axis, on the query's dilation sub-grid, and contains the query.
    for length, k, d in [(7, 7, 1), (14, 7, 2), (13, 3, 3), (30, 5, 2), (56, 7, 8)]:
        start, bias = window_starts(length, k, d)
        for i in range(length):
            keys = start[i] + d * np.arange(k)
            assert keys.min() >= 0 and keys.max() < length
            assert np.all(keys % d == i % d) and i in keys
            assert bias[i] >= 0 and bias[i] + k - 1 <= 2 * k - 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q: functional.na2d_qk(q, q, 7, 2), "smaller than kernel_size \\* dilation"),
        (lambda q: functional.na2d_qk(q, q, 4, 1), "odd integer"),
        (lambda q: functional.na2d_qk(q, q, 3, 0), "dilation"),
        (lambda q: functional.na2d_qk(q[0], q[0], 3, 1), "5-D"),
        (lambda q: functional.na2d_qk(q, q[:, :1], 3, 1), "key has shape"),
        (lambda q: functional.na2d_qk(q, q, 3, 1, rpb=np.ones((2, 3, 3))), "rpb has shape"),
        (lambda q: functional.na2d_av(np.ones((1, 2, 9, 10, 8)), q, 3, 1), "attn has shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    q = np.random.default_rng(1).standard_normal((1, 2, 9, 10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        call(q)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "selu"])
@pytest.mark.torch
def test_linear_activations_equal_pytorch(activation, products):
    torch = pytest.importorskip("torch")
    from transformers.activations import ACT2FN

    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 24)).astype(np.float32) * 3
    weight = rng.standard_normal((24, 40)).astype(np.float32) * 0.5
    bias = rng.standard_normal(40).astype(np.float32)
    # transformers' ACT2FN has no "selu" (its DiNAT would fail on it); PyTorch's own is the reference.
    function = torch.nn.functional.selu if activation == "selu" else ACT2FN[activation]
    expected = function(torch.from_numpy(x @ weight + bias)).numpy()
    np.testing.assert_allclose(cpu.linear(x, Linear(weight, bias), activation), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows, in_features, channels", [(37, 24, 33), (2 * 7 * 9, 40, 64), (5, 8, 1)])
def test_linear_residual_with_norm_equals_float64_reference(rows, in_features, channels, products):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    weight_t = (rng.standard_normal((in_features, channels)) * in_features**-0.5).astype(np.float32)
    bias, scale, norm_weight, norm_bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(4))
    residual = (rng.standard_normal((rows, channels)) * 3 + 1.5).astype(np.float32)  # mean far from 0
    if rows == 2 * 7 * 9:  # channels-last feature maps, as the model passes them
        x, residual = x.reshape(2, 7, 9, in_features), residual.reshape(2, 7, 9, channels)
    norm = Norm(norm_weight, norm_bias, 1e-5)

    out, normed = cpu.linear_residual(x, Linear(weight_t, bias), scale, residual, norm=norm)

    f64 = np.float64
    expected = residual.astype(f64) + scale.astype(f64) * (x.astype(f64) @ weight_t.astype(f64) + bias)
    mean = expected.mean(axis=-1, keepdims=True)
    variance = ((expected - mean) ** 2).mean(axis=-1, keepdims=True)
    expected_normed = (expected - mean) / np.sqrt(variance + norm.eps) * norm_weight.astype(f64) + norm_bias
    assert out.shape == normed.shape == residual.shape
    assert out.dtype == normed.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(normed, expected_normed, rtol=0, atol=1e-5)
    # the same numbers as LayerNorm on its own
    np.testing.assert_allclose(normed, cpu.layer_norm(out, norm), rtol=0, atol=1e-6)
