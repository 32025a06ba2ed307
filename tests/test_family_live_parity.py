"""Live parity of DiNAT_s and the isotropic models with the PyTorch reference of tests/reference/family.py
(itself held to SHI-Labs' fixtures in test_family_reference.py), on random architectures: kernel sizes,
dilations, patch sizes, odd input sizes, maps smaller than the window, no head, every parameter random."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from dinat_np import AutoModelForImageClassification, DinatSBackbone  # noqa: E402
from dinat_np.convert_family import config_from_original_args, family_original_to_hf  # noqa: E402
from tests.reference.family import build  # noqa: E402
from tests.reference.random_weights import randomize  # noqa: E402

ATOL = 1e-4


def models(constructor: str, kwargs: dict, seed: int):
    """The reference with random weights, and the engine's model converted from its state_dict."""
    reference = build(constructor, kwargs)
    randomize(reference, seed)
    original = {name: tensor.numpy() for name, tensor in reference.state_dict().items()}
    config = config_from_original_args({"constructor": constructor, "kwargs": kwargs})
    tensors = family_original_to_hf(original, config)
    model = AutoModelForImageClassification.model_class(config)(config, tensors=tensors, source="the reference")
    return reference, model, tensors


def close(actual: np.ndarray, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == tuple(expected.shape), name
    np.testing.assert_allclose(actual, expected.numpy(), rtol=0, atol=ATOL, err_msg=name)


def random_dinat_s(rng: np.random.Generator) -> dict:
    stages = int(rng.integers(2, 5))
    depths = [int(d) for d in rng.integers(1, 3, size=stages)]
    kernel_size = int(rng.choice([3, 5, 7]))
    return dict(
        patch_size=int(rng.choice([2, 4])), embed_dim=int(rng.choice([8, 16])), depths=depths,
        num_heads=[int(h) for h in rng.choice([1, 2, 4], size=stages)], kernel_size=kernel_size,
        dilations=[[int(d) for d in rng.integers(1, 5, size=depth)] for depth in depths],
        mlp_ratio=float(rng.choice([1.5, 2.0, 4.0])), qkv_bias=bool(rng.random() < 0.8),
        patch_norm=bool(rng.random() < 0.8), num_classes=int(rng.choice([0, 3, 10])),
    )


@pytest.mark.parametrize("seed", range(5))
def test_random_dinat_s(seed):
    rng = np.random.default_rng(seed)
    kwargs = random_dinat_s(rng)
    height, width = (int(s) | 1 for s in rng.integers(25, 90, size=2))
    pixels = rng.standard_normal((int(rng.integers(1, 3)), 3, height, width)).astype(np.float32)
    reference, model, tensors = models("DiNAT_s", kwargs, seed)
    out = model(pixels, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        torch_pixels = torch.from_numpy(pixels)
        embedded, before_merging, after_merging = reference.forward_stages(torch_pixels)
        close(out.logits, reference(torch_pixels), "logits")
        pooled = reference.forward_features(torch_pixels)
    close(model.base_model._forward(pixels, False, False)[0].pooler_output, pooled, "pooled features")
    assert len(out.hidden_states) == len(kwargs["depths"]) + 1 == len(out.attentions) + 1
    for i, expected in enumerate([embedded] + after_merging):
        close(out.hidden_states[i], expected, f"hidden_states.{i}")
        close(out.reshaped_hidden_states[i], expected.permute(0, 3, 1, 2), f"reshaped_hidden_states.{i}")

    # The backbone: each stage's output before patch merging, through a LayerNorm of its own.
    stages = model.config.stage_names[1:]
    config = type(model.config).from_dict({**model.config.to_dict(), "out_features": stages, "out_indices": None})
    backbone_tensors = {name[len("dinat_s."):]: t for name, t in tensors.items() if name.startswith("dinat_s.")}
    norms = {}
    for stage, state in zip(stages, before_merging, strict=True):
        channels = state.shape[-1]
        norms[stage] = (1.0 + 0.2 * rng.standard_normal(channels).astype(np.float32),
                        0.1 * rng.standard_normal(channels).astype(np.float32))
        weight, bias = norms[stage]
        backbone_tensors[f"hidden_states_norms.{stage}.weight"] = weight
        backbone_tensors[f"hidden_states_norms.{stage}.bias"] = bias
    backbone = DinatSBackbone(config, tensors=backbone_tensors, source="the reference")
    maps = backbone(pixels, output_hidden_states=True)
    for i, (stage, state) in enumerate(zip(stages, before_merging, strict=True)):
        close(maps.hidden_states[i + 1], state, f"backbone hidden_states.{i + 1}")
        weight, bias = (torch.from_numpy(array) for array in norms[stage])
        expected = torch.nn.functional.layer_norm(state, (state.shape[-1],), weight, bias, eps=1e-5)
        close(maps.feature_maps[i], expected.permute(0, 3, 1, 2), f"feature_maps.{i}")


@pytest.mark.parametrize("seed", range(4))
def test_random_nat_and_dinat_isotropic(seed):
    rng = np.random.default_rng(100 + seed)
    heads = int(rng.choice([1, 2, 4]))
    kwargs = dict(
        patch_size=int(rng.choice([4, 8, 16])), embed_dim=8 * heads, depth=int(rng.integers(1, 5)), num_heads=heads,
        kernel_size=int(rng.choice([3, 5, 7])), dilation=int(rng.integers(1, 4)),
        mlp_ratio=float(rng.choice([2.0, 4.0])),
        qkv_bias=bool(rng.random() < 0.8), patch_norm=bool(rng.random() < 0.8), num_classes=int(rng.choice([0, 7])),
    )
    # Any input size: the original ran at img_size // patch_size tokens per side only; maps smaller than
    # the window are padded, as in DiNAT.
    height, width = (int(s) | 1 for s in rng.integers(40, 130, size=2))
    pixels = rng.standard_normal((int(rng.integers(1, 3)), 3, height, width)).astype(np.float32)
    reference, model, _ = models("NATIsotropic", kwargs, seed)
    out = model(pixels, output_hidden_states=True)
    with torch.no_grad():
        torch_pixels = torch.from_numpy(pixels)
        close(out.logits, reference(torch_pixels), "logits")
        close(model.base_model._forward(pixels, False, False)[0].pooler_output,
              reference.forward_features(torch_pixels), "pooled features")
        close(out.hidden_states[0], reference.patch_embed(torch_pixels), "embeddings")


@pytest.mark.parametrize("seed", range(3))
def test_random_vitrpb(seed):
    rng = np.random.default_rng(200 + seed)
    heads, patch_size, side = int(rng.choice([1, 2, 3])), int(rng.choice([4, 8])), int(rng.integers(3, 8))
    kwargs = dict(
        img_size=side * patch_size, patch_size=patch_size, embed_dim=8 * heads, depth=int(rng.integers(1, 4)),
        num_heads=heads, kernel_size=None, dilation=None, layer="VisionTransformerLayer",
        mlp_ratio=float(rng.choice([2.0, 4.0])), qkv_bias=bool(rng.random() < 0.8), num_classes=5,
    )
    # Any size that the zero padding brings to the token grid the bias table is made for.
    height, width = (int(s) for s in rng.integers((side - 1) * patch_size + 1, side * patch_size + 1, size=2))
    pixels = rng.standard_normal((2, 3, height, width)).astype(np.float32)
    reference, model, _ = models("NATIsotropic", kwargs, seed)
    out = model(pixels, output_attentions=True)
    with torch.no_grad():
        close(out.logits, reference(torch.from_numpy(pixels)), "logits")
    assert out.attentions[0].shape == (2, heads, side**2, side**2)
    np.testing.assert_allclose(out.attentions[0].sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=f"made for {side}x{side} tokens"):
        model(rng.standard_normal((1, 3, side * patch_size + 1, height)).astype(np.float32))
