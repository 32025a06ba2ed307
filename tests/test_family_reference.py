"""The PyTorch reference of tests/reference/family.py reproduces SHI-Labs' own models (fixtures computed
with their code and NATTEN's kernels), so that the engine can later be checked against it live."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from tests.helpers import DATA  # noqa: E402
from tests.reference.family import build, relative_position_index  # noqa: E402

FAMILY = DATA / "family"
MANIFEST = {item["name"]: item for item in json.loads((FAMILY / "manifest.json").read_text())["models"]}


def load_fixture(name: str) -> tuple[torch.nn.Module, dict]:
    item = MANIFEST[name]
    model = build(item["constructor"], item["kwargs"])
    model.load_state_dict(torch.load(FAMILY / name / "checkpoint.pth", weights_only=True), strict=True)
    return model, dict(np.load(FAMILY / name / "expected.npz"))


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_reference_reproduces_the_original_logits_and_pooled_features(name):
    model, expected = load_fixture(name)
    pixels = torch.from_numpy(expected["pixel_values"])
    with torch.no_grad():
        pooled = model.forward_features(pixels).numpy()
        logits = model(pixels).numpy()
    np.testing.assert_allclose(pooled, expected["pooled_features"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)


def test_stored_vitrpb_index_is_the_key_minus_query_offset():
    """The flipud/fliplr of the original code amount to indexing the table by key minus query."""
    state = torch.load(FAMILY / "original_vitrpb_cfg" / "checkpoint.pth", weights_only=True)
    length = 96 // 16
    for name, stored in state.items():
        if name.endswith("relative_position_index"):
            assert torch.equal(stored, relative_position_index(length)), name
