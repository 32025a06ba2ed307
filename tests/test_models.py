"""The models against HF transformers 4.53.3 + NATTEN 0.17.5 outputs (tests/data/hf_*), and their contract."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dinat_np
from dinat_np import DinatBackbone, DinatConfig, DinatForImageClassification, DinatModel, WeightsMismatchError
from dinat_np.state_dict import read_safetensors, write_safetensors

from tests.helpers import DATA

FIXTURES = ["hf_dinat_small_cfg", "hf_dinat_layerscale_oddsize"]
ATOL = 1e-4


def close(actual, expected, name):
    assert actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    return DATA / request.param, np.load(DATA / request.param / "expected.npz")


def test_classifier_outputs_equal_reference(fixture):
    folder, expected = fixture
    model = DinatForImageClassification.from_pretrained(folder)
    out = model(expected["pixel_values"], output_hidden_states=True, output_attentions=True)
    close(out.logits, expected["logits"], "logits")
    assert len(out.hidden_states) == len(out.reshaped_hidden_states) == 5 and len(out.attentions) == 4
    for i in range(5):
        close(out.hidden_states[i], expected[f"hidden_states.{i}"], f"hidden_states.{i}")
        close(out.reshaped_hidden_states[i], expected[f"reshaped_hidden_states.{i}"], f"reshaped_hidden_states.{i}")
    for i in range(4):
        close(out.attentions[i], expected[f"attentions.{i}"], f"attentions.{i}")
    assert out.loss is None


def test_base_model_outputs_equal_reference(fixture):
    folder, expected = fixture
    out = DinatModel.from_pretrained(folder)(expected["pixel_values"])
    close(out.last_hidden_state, expected["last_hidden_state"], "last_hidden_state")
    close(out.pooler_output, expected["pooler_output"], "pooler_output")
    assert out.hidden_states is None and out.attentions is None
    assert DinatModel.from_pretrained(folder, add_pooling_layer=False)(expected["pixel_values"]).pooler_output is None


def backbone_folder(folder, target, out_features):
    """An HF DinatBackbone checkpoint: the classifier's base weights plus the fixture's stage norms."""
    config = DinatConfig.from_pretrained(folder).to_dict()
    config.update(out_features=out_features, out_indices=None)
    DinatConfig.from_dict(config).save_pretrained(target)
    classifier = read_safetensors(folder / "model.safetensors")
    tensors = {n[len("dinat."):]: t for n, t in classifier.items() if n.startswith("dinat.")}
    norms = read_safetensors(folder / "backbone_norms.safetensors")
    tensors.update({n: t for n, t in norms.items() if n.split(".")[1] in out_features})
    write_safetensors(target / "model.safetensors", tensors)
    return target


def test_backbone_feature_maps_equal_reference(fixture, tmp_path):
    folder, expected = fixture
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = DinatBackbone.from_pretrained(backbone_folder(folder, tmp_path, stages))
    out = backbone(expected["pixel_values"], output_hidden_states=True, output_attentions=True)
    assert len(out.feature_maps) == 4 and len(out.attentions) == 4 and len(out.hidden_states) == 5
    for i in range(4):
        close(out.feature_maps[i], expected[f"backbone.feature_maps.{i}"], f"feature_maps.{i}")
    as_tuple = backbone(expected["pixel_values"], return_dict=False)
    assert len(as_tuple) == 1 and len(as_tuple[0]) == 4


def test_backbone_subset_of_stages(tmp_path):
    folder = DATA / "hf_dinat_small_cfg"
    expected = np.load(folder / "expected.npz")
    backbone = DinatBackbone.from_pretrained(backbone_folder(folder, tmp_path, ["stage2", "stage4"]))
    maps = backbone(expected["pixel_values"]).feature_maps
    close(maps[0], expected["backbone.feature_maps.1"], "stage2")
    close(maps[1], expected["backbone.feature_maps.3"], "stage4")


def test_tuple_outputs_follow_hf_order():
    folder = DATA / "hf_dinat_small_cfg"
    expected = np.load(folder / "expected.npz")
    model = DinatForImageClassification.from_pretrained(folder)
    logits, hidden_states, attentions, reshaped = model(
        expected["pixel_values"], output_hidden_states=True, output_attentions=True, return_dict=False
    )
    close(logits, expected["logits"], "logits")
    assert len(hidden_states) == 5 and len(attentions) == 4 and reshaped[1].shape == (2, 32, 8, 8)
    out = model(expected["pixel_values"])
    assert out["logits"] is out.logits and out[0] is out.logits


@pytest.mark.parametrize("problem_type, make_labels", [
    (None, lambda rng, n, c: rng.integers(0, c, n)),
    ("single_label_classification", lambda rng, n, c: np.array([3, -100])),
    ("multi_label_classification", lambda rng, n, c: rng.integers(0, 2, (n, c)).astype(np.float32)),
    ("regression", lambda rng, n, c: rng.standard_normal((n, c)).astype(np.float32)),
])
@pytest.mark.torch
def test_loss_equals_torch(problem_type, make_labels):
    torch = pytest.importorskip("torch")
    folder = DATA / "hf_dinat_small_cfg"
    expected = np.load(folder / "expected.npz")
    config = DinatConfig.from_pretrained(folder)
    config.problem_type = problem_type
    model = DinatForImageClassification(config, tensors=read_safetensors(folder / "model.safetensors"))
    labels = make_labels(np.random.default_rng(0), 2, config.num_labels)
    out = model(expected["pixel_values"], labels=labels)
    logits, target = torch.from_numpy(expected["logits"]).double(), torch.from_numpy(labels)
    if problem_type == "multi_label_classification":
        reference = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.double())
    elif problem_type == "regression":
        reference = torch.nn.functional.mse_loss(logits, target.double())
    else:
        reference = torch.nn.functional.cross_entropy(logits, target.long())
    assert abs(float(out.loss) - float(reference)) < 1e-4
    assert model(expected["pixel_values"], labels=labels, return_dict=False)[0] == out.loss


def test_any_input_size_including_tiny_maps():
    rng = np.random.default_rng(3)
    model = DinatForImageClassification.from_pretrained(DATA / "hf_dinat_layerscale_oddsize")
    for height, width in [(1, 1), (5, 37), (33, 17)]:
        pixels = rng.standard_normal((1, 3, height, width)).astype(np.float32)
        logits = model(pixels).logits
        assert logits.shape == (1, 7) and np.isfinite(logits).all()


@pytest.mark.parametrize("pixels, error, message", [
    (np.ones((3, 8, 8), np.float32), ValueError, "4-D"),
    (np.ones((1, 4, 8, 8), np.float32), ValueError, "channels"),
    (np.ones((1, 3, 8, 8), np.uint8), TypeError, "floating point"),
    (np.full((1, 3, 8, 8), np.nan, np.float32), ValueError, "NaN"),
    (np.ones((0, 3, 8, 8), np.float32), ValueError, "empty"),
    ([[1.0]], TypeError, "NumPy array"),
])
def test_wrong_input_is_a_clear_error(pixels, error, message):
    model = DinatForImageClassification.from_pretrained(DATA / "hf_dinat_small_cfg")
    with pytest.raises(error, match=message):
        model(pixels)


def test_float64_input_is_accepted():
    folder = DATA / "hf_dinat_small_cfg"
    expected = np.load(folder / "expected.npz")
    model = DinatForImageClassification.from_pretrained(folder)
    close(model(expected["pixel_values"].astype(np.float64)).logits, expected["logits"], "logits")


def test_weight_mismatches_list_every_name(tmp_path):
    folder = DATA / "hf_dinat_small_cfg"
    DinatConfig.from_pretrained(folder).save_pretrained(tmp_path)
    tensors = dict(read_safetensors(folder / "model.safetensors"))
    del tensors["dinat.layernorm.weight"]
    del tensors["dinat.encoder.levels.1.layers.0.attention.self.rpb"]
    tensors["dinat.encoder.levels.0.layers.0.attention.self.query.weight"] = np.ones((16, 8), np.float32)
    tensors["dinat.extra.weight"] = np.ones(3, np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(WeightsMismatchError) as caught:
        DinatForImageClassification.from_pretrained(tmp_path)
    message = str(caught.value)
    for name in ["dinat.layernorm.weight", "levels.1.layers.0.attention.self.rpb", "dinat.extra.weight",
                 "levels.0.layers.0.attention.self.query.weight (16, 8)"]:
        assert name in message


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    folder = DATA / "hf_dinat_small_cfg"
    DinatConfig.from_pretrained(folder).save_pretrained(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        DinatForImageClassification.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    with pytest.raises(ValueError, match="not valid JSON"):
        DinatForImageClassification.from_pretrained(tmp_path)


def test_weights_are_memory_mapped():
    tensors = read_safetensors(DATA / "hf_dinat_small_cfg" / "model.safetensors")
    assert all(isinstance(t.base, np.memmap) or isinstance(t, np.memmap) for t in tensors.values())


def test_half_precision_storage_and_save_round_trip(tmp_path):
    folder = DATA / "hf_dinat_small_cfg"
    expected = np.load(folder / "expected.npz")
    model = DinatForImageClassification.from_pretrained(folder)
    for dtype, tolerance in [("float32", 0.0), ("float16", 1e-2), ("bfloat16", 5e-2)]:
        model.save_pretrained(tmp_path / dtype, dtype=dtype)
        reloaded = DinatForImageClassification.from_pretrained(tmp_path / dtype)
        np.testing.assert_allclose(reloaded(expected["pixel_values"]).logits, expected["logits"], atol=tolerance + 1e-5)


def test_random_initialisation_is_seeded():
    config = DinatConfig(
        embed_dim=8, depths=[1, 1], num_heads=[1, 2], dilations=[[1], [1]], kernel_size=3, num_labels=4
    )
    pixels = np.random.default_rng(0).standard_normal((2, 3, 20, 24)).astype(np.float32)
    first = DinatForImageClassification(config, seed=1)(pixels).logits
    np.testing.assert_array_equal(first, DinatForImageClassification(config, seed=1)(pixels).logits)
    assert not np.allclose(first, DinatForImageClassification(config, seed=2)(pixels).logits)


def test_two_threads_share_one_model():
    folder = DATA / "hf_dinat_layerscale_oddsize"
    expected = np.load(folder / "expected.npz")
    model = DinatForImageClassification.from_pretrained(folder)
    rng = np.random.default_rng(5)
    inputs = [expected["pixel_values"], rng.standard_normal((2, 3, 64, 48)).astype(np.float32)]
    serial = [model(x).logits for x in inputs]
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(index):
        try:
            for _ in range(6):
                results[index].append(model(inputs[index]).logits)
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for index in range(2):
        for logits in results[index]:
            np.testing.assert_array_equal(logits, serial[index])


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, dinat_np, dinat_np.functional; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert dinat_np.__version__


def test_random_initialisation_follows_hf():
    config = DinatConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 2], dilations=[[1], [2]], kernel_size=3,
                         layer_scale_init_value=0.25, out_features=["stem", "stage2"])
    tensors = DinatBackbone(config, seed=0).state_dict()
    for name, tensor in tensors.items():
        if "norm" in name and name.endswith(".weight"):
            np.testing.assert_array_equal(tensor, 1.0, err_msg=name)
        elif name.endswith((".bias", ".rpb")):
            np.testing.assert_array_equal(tensor, 0.0, err_msg=name)
        elif name.endswith("layer_scale_parameters"):
            np.testing.assert_array_equal(tensor, 0.25, err_msg=name)
        else:
            assert 0.01 < tensor.std() < 0.03, name  # N(0, initializer_range = 0.02)
    assert "hidden_states_norms.stem.weight" in tensors


def test_classifier_holds_its_base_model_as_hf_does():
    folder = DATA / "hf_dinat_small_cfg"
    expected = np.load(folder / "expected.npz")
    model = DinatForImageClassification.from_pretrained(folder)
    assert isinstance(model.dinat, DinatModel) and model.base_model is model.dinat
    bare = DinatModel.from_pretrained(folder)
    assert bare.base_model is bare
    close(model.dinat(expected["pixel_values"]).last_hidden_state, expected["last_hidden_state"], "last_hidden_state")
    base_weights, bare_weights = model.dinat.state_dict(), bare.state_dict()
    assert base_weights.keys() == bare_weights.keys() and not any(n.startswith("dinat.") for n in base_weights)
    for name, tensor in bare_weights.items():
        np.testing.assert_array_equal(base_weights[name], tensor, err_msg=name)
    assert set(model.state_dict()) == {f"dinat.{n}" for n in bare_weights} | {"classifier.weight", "classifier.bias"}


def test_nat_classifier_names_its_base_model_nat():
    config = DinatConfig(model_type="nat", embed_dim=8, depths=[1, 1], num_heads=[1, 2], kernel_size=3, num_labels=3)
    model = DinatForImageClassification(config, seed=0)
    assert isinstance(model.nat, DinatModel) and model.base_model is model.nat and not hasattr(model, "dinat")
    tensors = model.state_dict()
    assert all(name.startswith(("nat.", "classifier.")) for name in tensors)
    pixels = np.random.default_rng(1).standard_normal((1, 3, 24, 20)).astype(np.float32)
    bare = DinatModel(config, tensors=tensors)  # the base weights of a classification checkpoint
    np.testing.assert_array_equal(bare(pixels).pooler_output, model.nat(pixels).pooler_output)
