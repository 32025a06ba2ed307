"""Live parity with PyTorch: transformers 4.53.3's own DiNAT / NAT modeling code, run here with the
reference neighborhood attention of tests/reference/torch_natten.py (itself checked against NATTEN's
kernels in test_torch_natten.py), on random configurations with every parameter drawn at random."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

import dinat_np  # noqa: E402
from tests.reference.random_weights import randomize  # noqa: E402
from tests.reference.torch_natten import patch_transformers  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def reference_attention():
    with patch_transformers():
        yield


def random_config(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    depths = [int(d) for d in rng.integers(1, 3, size=4)]
    heads = [int(h) for h in rng.choice([1, 2, 4], size=4)]
    embed_dim = int(rng.choice([8, 16])) * max(heads[0], 1)
    kernel_size = int(rng.choice([3, 5, 7, 9, 11]))
    dilations = [[int(d) for d in rng.integers(1, 9 if stage == 0 else 4, size=depth)]
                 for stage, depth in enumerate(depths)]
    return dict(
        embed_dim=embed_dim, depths=depths, num_heads=heads, kernel_size=kernel_size, dilations=dilations,
        mlp_ratio=float(rng.choice([2.0, 3.0])), layer_scale_init_value=float(rng.choice([0.0, 0.1])),
        hidden_act=str(rng.choice(["gelu", "gelu_new", "relu"])), qkv_bias=bool(rng.random() < 0.8),
        num_labels=int(rng.integers(2, 12)),
    )


def compare(config_kwargs: dict, pixels: np.ndarray, tmp_path, seed: int, nat: bool = False) -> None:
    if nat:
        hf_config = transformers.NatConfig(**config_kwargs)
        hf_model = transformers.NatForImageClassification(hf_config)
    else:
        hf_config = transformers.DinatConfig(**config_kwargs)
        hf_model = transformers.DinatForImageClassification(hf_config)
    randomize(hf_model, seed)
    hf_model.eval().save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(pixels), output_hidden_states=True, output_attentions=True)

    model = dinat_np.DinatForImageClassification.from_pretrained(tmp_path)
    out = model(pixels, output_hidden_states=True, output_attentions=True)
    np.testing.assert_allclose(out.logits, expected.logits.numpy(), rtol=0, atol=ATOL, err_msg="logits")
    for name in ("hidden_states", "reshaped_hidden_states", "attentions"):
        ours, theirs = getattr(out, name), getattr(expected, name)
        assert len(ours) == len(theirs), name
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert a.shape == tuple(b.shape), f"{name}.{i}"
            np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=ATOL, err_msg=f"{name}.{i}")


@pytest.mark.parametrize("seed", range(6))
def test_random_dinat_configs(seed, tmp_path):
    config = random_config(seed)
    rng = np.random.default_rng(100 + seed)
    height, width = (int(s) | 1 for s in rng.integers(33, 97, size=2))  # odd sizes
    batch = int(rng.integers(1, 4))
    pixels = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
    compare(config, pixels, tmp_path, seed)


def test_nat_config(tmp_path):
    config = dict(embed_dim=16, depths=[1, 2, 1, 1], num_heads=[2, 2, 4, 4], kernel_size=5, mlp_ratio=2.0,
                  layer_scale_init_value=0.2, num_labels=6)
    pixels = np.random.default_rng(7).standard_normal((2, 3, 71, 57)).astype(np.float32)
    compare(config, pixels, tmp_path, seed=7, nat=True)


def test_dinat_mini_at_224(tmp_path):
    pixels = np.random.default_rng(8).standard_normal((1, 3, 224, 224)).astype(np.float32)
    compare(dict(num_labels=1000), pixels, tmp_path, seed=8)
