"""The ops the family adds to the backend contract, on the CPU backend, against PyTorch: the patch embedding,
patch merging, and global attention with ViT-rpb's relative position bias (the CUDA versions are held to
these in tests/test_cuda_sim.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
F = torch.nn.functional

from dinat_np.kernels import Conv, get_backend  # noqa: E402
from tests.reference.family import relative_position_index  # noqa: E402

ops = get_backend("cpu")
ATOL = 1e-5


@pytest.mark.parametrize("patch_size, height, width, bias", [(4, 23, 18, True), (16, 96, 100, True), (3, 7, 9, False)])
def test_patch_embedding_is_a_strided_convolution_of_the_zero_padded_image(patch_size, height, width, bias):
    rng = np.random.default_rng(patch_size)
    pixels = rng.standard_normal((2, 3, height, width)).astype(np.float32)
    weight = rng.standard_normal((8, 3, patch_size, patch_size)).astype(np.float32) / patch_size
    conv_bias = rng.standard_normal(8).astype(np.float32) if bias else None
    conv = Conv(ops.conv_weight(weight), None if conv_bias is None else ops.upload(conv_bias))
    ours = ops.patch_embedding(ops.nchw_to_nhwc(pixels), conv, patch_size)
    padded = F.pad(torch.from_numpy(pixels), (0, -width % patch_size, 0, -height % patch_size))
    theirs = F.conv2d(padded, torch.from_numpy(weight), None if conv_bias is None else torch.from_numpy(conv_bias),
                      stride=patch_size).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, -(-height // patch_size), -(-width // patch_size), 8)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


def test_patch_embedding_refuses_a_bad_patch_size():
    with pytest.raises(ValueError, match="patch_size"):
        ops.patch_embedding(np.zeros((1, 4, 4, 3), np.float32), Conv(np.zeros((0, 8), np.float32)), 0)


@pytest.mark.parametrize("height, width", [(7, 5), (6, 8), (1, 1)])
def test_patch_merging_concatenates_the_four_neighbours_in_swin_order(height, width):
    x = np.random.default_rng(height).standard_normal((2, height, width, 4)).astype(np.float32)
    ours = ops.patch_merging(x)
    padded = F.pad(torch.from_numpy(x), (0, 0, 0, width % 2, 0, height % 2))
    theirs = torch.cat([padded[:, 0::2, 0::2], padded[:, 1::2, 0::2], padded[:, 0::2, 1::2], padded[:, 1::2, 1::2]], -1)
    np.testing.assert_array_equal(ours, theirs.numpy())


def global_attention_reference(qkv, rpb, scale, qkv_bias):
    """ViT-rpb's attention in PyTorch, the bias gathered through the original's index."""
    batch, length, _, _, heads, head_dim = qkv.shape
    tokens = length * length
    fused = torch.from_numpy(qkv.reshape(batch, tokens, -1) + (0 if qkv_bias is None else qkv_bias))
    query, key, value = fused.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    bias = torch.from_numpy(rpb).flatten(1)[:, relative_position_index(length)]
    attention = ((query * scale) @ key.transpose(-2, -1) + bias).softmax(dim=-1)
    context = (attention @ value).transpose(1, 2).reshape(batch, length, length, heads, head_dim)
    return context.numpy(), attention.numpy()


@pytest.mark.parametrize("length, heads, head_dim, bias", [(6, 2, 8, True), (7, 3, 5, False), (14, 2, 32, True)])
def test_global_attention_matches_vitrpb(length, heads, head_dim, bias):
    rng = np.random.default_rng(length)
    qkv = rng.standard_normal((2, length, length, 3, heads, head_dim)).astype(np.float32)
    rpb = rng.standard_normal((heads, 2 * length - 1, 2 * length - 1)).astype(np.float32)
    qkv_bias = rng.standard_normal(3 * heads * head_dim).astype(np.float32) if bias else None
    scale = head_dim**-0.5
    context, attention = ops.global_attention(qkv, rpb, scale, True, qkv_bias=qkv_bias)
    expected_context, expected_attention = global_attention_reference(qkv, rpb, scale, qkv_bias)
    assert attention.shape == (2, heads, length**2, length**2)
    np.testing.assert_allclose(context, expected_context, rtol=0, atol=ATOL)
    np.testing.assert_allclose(attention, expected_attention, rtol=0, atol=ATOL)
    alone, none = ops.global_attention(qkv, rpb, scale, qkv_bias=qkv_bias)
    assert none is None
    np.testing.assert_allclose(alone, expected_context, rtol=0, atol=ATOL)


@pytest.mark.parametrize("shape, rpb_shape", [((1, 6, 5, 3, 1, 4), (1, 11, 11)), ((1, 6, 6, 3, 1, 4), (1, 9, 9))])
def test_global_attention_refuses_a_map_the_table_is_not_made_for(shape, rpb_shape):
    with pytest.raises(ValueError, match="needs a square map"):
        ops.global_attention(np.zeros(shape, np.float32), np.zeros(rpb_shape, np.float32), 1.0)
