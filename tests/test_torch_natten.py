"""The PyTorch NATTEN reference (tests/reference/torch_natten.py) against NATTEN 0.17.5 and HF + NATTEN.

The reference is what the live-parity tests trust, so it is itself pinned here to ground truth
computed by the real NATTEN (na_cases.npz) and by transformers 4.53.3 running on NATTEN
(hf_dinat_small_cfg).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

from tests.reference.torch_natten import (  # noqa: E402
    na2d_av,
    na2d_qk,
    neighborhood_indices,
    patch_transformers,
)

DATA = Path(__file__).parent / "data"
NA_CASES = DATA / "na_cases.npz"
HF_SMALL = DATA / "hf_dinat_small_cfg"
N_CASES = 10


@pytest.fixture(scope="module")
def na_cases():
    with np.load(NA_CASES) as z:
        return {name: z[name] for name in z.files}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


@pytest.mark.parametrize("case", range(N_CASES))
def test_matches_natten_fixture(na_cases, case):
    q, k, v, rpb = (na_cases[f"case{case}_{n}"] for n in ("q", "k", "v", "rpb"))
    kernel_size = (rpb.shape[-1] + 1) // 2
    dilation = _case_dilation(case)

    logits = na2d_qk(_t(q), _t(k), kernel_size, dilation, rpb=_t(rpb))
    np.testing.assert_allclose(logits.numpy(), na_cases[f"case{case}_logits"], rtol=0, atol=1e-5)
    # NATTEN's out was computed from its own logits; feed ours (already checked) through softmax.
    out = na2d_av(torch.softmax(logits, dim=-1), _t(v), kernel_size, dilation)
    np.testing.assert_allclose(out.numpy(), na_cases[f"case{case}_out"], rtol=0, atol=1e-5)


def _case_dilation(case: int) -> int:
    cases = json.loads((DATA / "manifest.json").read_text())["na_cases"]
    (entry,) = [c for c in cases if c["case"] == case]
    return entry["dilation"]


def test_rpb_optional_and_float32(na_cases):
    q, k, rpb = (na_cases[f"case2_{n}"] for n in ("q", "k", "rpb"))
    plain = na2d_qk(torch.from_numpy(q), torch.from_numpy(k), 3, 3)
    with_rpb = na2d_qk(torch.from_numpy(q), torch.from_numpy(k), 3, 3, rpb=torch.from_numpy(rpb))
    assert plain.dtype == torch.float32
    np.testing.assert_allclose(with_rpb.numpy(), na_cases["case2_logits"], rtol=0, atol=1e-4)
    # Without rpb the logits differ exactly by the gathered bias.
    assert not np.allclose(plain.numpy(), with_rpb.numpy())


def test_window_shifted_inward_not_padded():
    # Length 7, k=3, d=2: sub-grids {0,2,4,6} and {1,3,5}.
    keys, bias = neighborhood_indices(7, 3, 2)
    np.testing.assert_array_equal(
        keys,
        [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]],
    )
    # Query 0 sits at the left edge of its window: offsets 0, +1, +2 -> rpb 2, 3, 4.
    np.testing.assert_array_equal(bias[0], [2, 3, 4])
    np.testing.assert_array_equal(bias[2], [1, 2, 3])
    np.testing.assert_array_equal(bias[6], [0, 1, 2])


@pytest.mark.parametrize("height,width,kernel_size,dilation", [(5, 9, 3, 2), (8, 8, 3, 3), (6, 20, 7, 1)])
def test_too_small_input_raises(height, width, kernel_size, dilation):
    x = torch.randn(1, 1, height, width, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        na2d_qk(x, x, kernel_size, dilation)


def test_even_kernel_raises():
    x = torch.randn(1, 1, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="odd"):
        na2d_qk(x, x, 4, 1)


def test_autograd_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    shape = (1, 2, 7, 9, 3)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, rpb):
        return na2d_av(torch.softmax(na2d_qk(q, k, 3, 2, rpb=rpb), -1), v, 3, 2)

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb), eps=1e-6, atol=1e-6)


def test_patched_hf_dinat_reproduces_fixture_logits():
    from transformers import DinatForImageClassification

    expected = np.load(HF_SMALL / "expected.npz")
    with patch_transformers():
        model = DinatForImageClassification.from_pretrained(HF_SMALL).eval()
        with torch.no_grad():
            out = model(
                torch.from_numpy(expected["pixel_values"]),
                output_hidden_states=True,
                output_attentions=True,
            )
    np.testing.assert_allclose(out.logits.numpy(), expected["logits"], rtol=0, atol=1e-4)
    for i, hidden in enumerate(out.hidden_states):
        np.testing.assert_allclose(hidden.numpy(), expected[f"hidden_states.{i}"], rtol=0, atol=1e-4)
    for i, attn in enumerate(out.attentions):
        np.testing.assert_allclose(attn.numpy(), expected[f"attentions.{i}"], rtol=0, atol=1e-4)


def test_patch_is_undone_on_exit():
    from transformers.models.dinat import modeling_dinat
    from transformers.utils import import_utils

    before = (modeling_dinat.natten2dqkrpb, modeling_dinat.natten2dav, import_utils.BACKENDS_MAPPING["natten"])
    with patch_transformers():
        assert import_utils.BACKENDS_MAPPING["natten"][0]() is True
    after = (modeling_dinat.natten2dqkrpb, modeling_dinat.natten2dav, import_utils.BACKENDS_MAPPING["natten"])
    assert before == after


def test_patched_hf_nat_runs_with_dilation_one():
    """NAT = DiNAT with every dilation 1: same weights, same logits."""
    from transformers import DinatConfig, DinatForImageClassification, NatConfig, NatForImageClassification

    kwargs = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3, mlp_ratio=2.0, num_labels=5)
    pixel_values = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    with patch_transformers():
        torch.manual_seed(0)
        nat = NatForImageClassification(NatConfig(**kwargs)).eval()
        dinat = DinatForImageClassification(DinatConfig(dilations=[[1], [1], [1, 1], [1]], **kwargs)).eval()
        state = {name.replace("nat.", "dinat.", 1) if name.startswith("nat.") else name: t
                 for name, t in nat.state_dict().items()}
        dinat.load_state_dict(state)
        with torch.no_grad():
            a = nat(pixel_values).logits
            b = dinat(pixel_values).logits
    assert torch.count_nonzero(a).item() == a.numel()
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)
