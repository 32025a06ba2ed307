"""DiNAT_s and the isotropic models end to end: SHI-Labs' fixtures converted by dinat-convert reproduce their
logits and pooled features; registry names download, convert and classify; every published architecture
converts at full size; the Auto classes load every family member."""

from __future__ import annotations

import functools

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from dinat_np import (  # noqa: E402
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    DinatForImageClassification,
    DinatSBackbone,
    DinatSConfig,
    DinatSForImageClassification,
    ImageClassifier,
    NatIsotropicConfig,
    NatIsotropicForImageClassification,
    NatIsotropicModel,
    hub,
)
from dinat_np.cli.classify import main as classify_main  # noqa: E402
from dinat_np.cli.convert import main as convert_main  # noqa: E402
from dinat_np import convert  # noqa: E402
from dinat_np import registry as registry_module  # noqa: E402
from dinat_np.convert import ConversionError, _check_tensors  # noqa: E402
from dinat_np.convert_family import (  # noqa: E402
    config_from_registry_entry,
    convert_family_state_dict,
    relative_position_index,
)
from dinat_np.modeling_auto import check_weights  # noqa: E402
from dinat_np.state_dict import read_safetensors  # noqa: E402

from tests.helpers import DATA, http_file_server, write_photos  # noqa: E402
from tests.helpers.family import PUBLISHED_FAMILY  # noqa: E402
from tests.reference.family import build  # noqa: E402

convert_checkpoint = functools.partial(convert.convert_checkpoint, check_weights=check_weights)

FAMILY = DATA / "family"
FIXTURES = {item["name"]: item for item in json.loads((FAMILY / "manifest.json").read_text())["models"]}
PUBLISHED = json.loads((FAMILY / "published.json").read_text())["models"]
ATOL = 1e-4


def original_args(name: str) -> dict:
    return {"constructor": FIXTURES[name]["constructor"], "kwargs": FIXTURES[name]["kwargs"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Each fixture converted once, with its constructor arguments."""
    root = tmp_path_factory.mktemp("converted")
    return {
        name: convert_checkpoint(FAMILY / name / "checkpoint.pth", root / name, original_args=original_args(name))
        for name in FIXTURES
    }


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_converted_fixtures_reproduce_logits_and_pooled_features(converted, name):
    expected = np.load(FAMILY / name / "expected.npz")
    pixels = expected["pixel_values"]
    classifier = AutoModelForImageClassification.from_pretrained(converted[name])
    assert type(classifier) is {"DiNAT_s": DinatSForImageClassification,
                                "NATIsotropic": NatIsotropicForImageClassification}[FIXTURES[name]["constructor"]]
    np.testing.assert_allclose(classifier(pixels).logits, expected["logits"], rtol=0, atol=ATOL)
    pooled = AutoModel.from_pretrained(converted[name])(pixels).pooler_output
    np.testing.assert_allclose(pooled, expected["pooled_features"], rtol=0, atol=ATOL)
    # the pooled features are what the head reads: logits = pooled @ head.T + bias
    state = classifier.state_dict()
    np.testing.assert_allclose(pooled @ state["classifier.weight"].T + state["classifier.bias"], expected["logits"],
                               rtol=0, atol=ATOL)


def test_converted_folders_record_their_architecture(converted):
    config = json.loads((converted["original_vitrpb_cfg"] / "config.json").read_text())
    assert config["model_type"] == "nat_isotropic" and config["attention"] == "global"
    assert config["architectures"] == ["NatIsotropicForImageClassification"] and config["grid_size"] == 6
    config = json.loads((converted["original_dinat_s_cfg"] / "config.json").read_text())
    assert config["model_type"] == "dinat_s" and config["dilations"] == [[1, 4], [1, 2], [1, 1], [1]]
    record = json.loads((converted["original_dinat_s_cfg"] / "conversion.json").read_text())
    assert record["original_args"]["constructor"] == "DiNAT_s" and record["preprocessing"]["resolution"] == 224
    record = json.loads((converted["original_vitrpb_cfg"] / "conversion.json").read_text())
    assert record["preprocessing"]["resolution"] == 96  # the model's img_size: ViT-rpb runs at no other
    names = read_safetensors(converted["original_dinat_s_cfg"] / "model.safetensors")
    assert "dinat_s.encoder.levels.0.downsample.reduction.weight" in names
    assert names["dinat_s.embeddings.patch_embeddings.projection.weight"].shape == (16, 3, 4, 4)


def test_models_save_and_reload_their_own_folders(converted, tmp_path):
    expected = np.load(FAMILY / "original_dinat_isotropic_cfg" / "expected.npz")
    model = AutoModelForImageClassification.from_pretrained(converted["original_dinat_isotropic_cfg"])
    model.save_pretrained(tmp_path)
    assert set(read_safetensors(tmp_path / "model.safetensors")) == set(model.state_dict())
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    np.testing.assert_array_equal(again(expected["pixel_values"]).logits, model(expected["pixel_values"]).logits)
    assert isinstance(again.base_model, NatIsotropicModel) and again.nat_isotropic is again.base_model


def test_dinat_convert_command_with_an_arguments_file(tmp_path, capsys):
    args = tmp_path / "args.json"
    args.write_text(json.dumps(original_args("original_vitrpb_cfg")))
    source = FAMILY / "original_vitrpb_cfg" / "checkpoint.pth"
    assert convert_main([str(source), str(tmp_path / "out"), "--original-args", str(args)]) == 0
    expected = np.load(FAMILY / "original_vitrpb_cfg" / "expected.npz")
    logits = AutoModelForImageClassification.from_pretrained(tmp_path / "out")(expected["pixel_values"]).logits
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=ATOL)

    # arguments that do not describe the checkpoint: every mismatch named, nothing written
    wrong = original_args("original_vitrpb_cfg")
    wrong["kwargs"] = dict(wrong["kwargs"], img_size=112)  # a 7x7 token grid: larger bias tables
    args.write_text(json.dumps(wrong))
    assert convert_main([str(source), str(tmp_path / "wrong"), "--original-args", str(args)]) == 1
    error = capsys.readouterr().err
    assert "do not form a complete nat_isotropic model" in error and "wrong shape" in error
    assert "attention.self.rpb (2, 11, 11) != expected (2, 13, 13)" in error
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.glob(".wrong*"))

    # no arguments at all: the message says what to pass
    assert convert_main([str(source), str(tmp_path / "bare")]) == 1
    assert "--original-args" in capsys.readouterr().err


def test_an_engine_folder_converts_again(converted, tmp_path):
    out = convert_checkpoint(converted["original_dinat_s_cfg"], tmp_path / "half", dtype="float16")
    expected = np.load(FAMILY / "original_dinat_s_cfg" / "expected.npz")
    logits = AutoModelForImageClassification.from_pretrained(out)(expected["pixel_values"]).logits
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=2e-2)


def test_vitrpb_refuses_images_of_another_size(converted):
    model = AutoModelForImageClassification.from_pretrained(converted["original_vitrpb_cfg"])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 97, 96)).astype(np.float32)
    with pytest.raises(ValueError, match=r"made for 6x6 tokens, i\.e\. images of 81 to 96 pixels per side"):
        model(pixels)
    assert model(pixels[:, :, :81, :90]).logits.shape == (1, 10)  # zero-padded to 96x96 as in the original


def test_auto_classes_load_every_family_member(converted, tmp_path):
    for folder in converted.values():
        assert AutoConfig.from_pretrained(folder).model_type in ("dinat_s", "nat_isotropic")
    dinat = AutoModelForImageClassification.from_pretrained(DATA / "hf_dinat_small_cfg")
    assert type(dinat) is DinatForImageClassification
    backbone = AutoBackbone.from_config(DinatSConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 2], kernel_size=3,
                                                     out_features=["stage1", "stage2"]))
    assert isinstance(backbone, DinatSBackbone)
    maps = backbone(np.random.default_rng(1).standard_normal((1, 3, 30, 22)).astype(np.float32)).feature_maps
    assert [m.shape for m in maps] == [(1, 8, 8, 6), (1, 16, 4, 3)]
    with pytest.raises(ValueError, match="AutoBackbone has no model for model_type 'nat_isotropic'"):
        AutoBackbone.from_config(NatIsotropicConfig())


# ---------------------------------------------------------------------------------------------
# registry names: download, convert, classify (a local server stands in for SHI-Labs' host)


def test_a_family_registry_name_downloads_converts_and_classifies(tmp_path, monkeypatch):
    item = FIXTURES["original_dinat_s_cfg"]
    fields = {key: value for key, value in AutoConfig.from_pretrained(
        convert_checkpoint(FAMILY / item["name"] / "checkpoint.pth", tmp_path / "probe",
                           original_args=original_args(item["name"]))).to_dict().items()
        if key in DinatSConfig.FIELDS}
    entry = {
        "model_type": "dinat_s", "description": "tiny DiNAT_s", "architecture": fields, "num_labels": 10,
        "url": "https://example.invalid/checkpoint.pth", "label_set": None,
        "preprocessing": {"resolution": 64, "crop_pct": 1.0, "interpolation": "bilinear"},
    }
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": {"tiny-dinat-s": entry}}))
    with http_file_server({"checkpoint.pth": (FAMILY / item["name"] / "checkpoint.pth").read_bytes()}) as server:
        monkeypatch.setenv(registry_module.ENV_REGISTRY, str(registry))
        monkeypatch.setenv(hub.ENV_HOME, str(tmp_path / "home"))
        monkeypatch.setenv(hub.ENV_BASE_URL, server.url)
        classifier = ImageClassifier.from_pretrained("tiny-dinat-s", progress=False)
    assert isinstance(classifier.model, DinatSForImageClassification)
    predictions = classifier.predict(write_photos(tmp_path / "photos", 2), top_k=3)
    assert len(predictions) == 2 and all(len(p) == 3 for p in predictions)
    expected = np.load(FAMILY / item["name"] / "expected.npz")
    np.testing.assert_allclose(classifier.model(expected["pixel_values"]).logits, expected["logits"], rtol=0, atol=ATOL)


def test_dinat_classify_runs_a_family_model(converted, tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", 2)
    arguments = ["--weights", str(converted["original_vitrpb_cfg"]), "--json", "--top-k", "2", "--no-progress"]
    assert classify_main([*arguments, *map(str, photos)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert "LABEL_" in json.dumps(document) and json.dumps(document).count('"score"') == 4


# ---------------------------------------------------------------------------------------------
# the 12 published architectures at full size (random weights: names and shapes)


@pytest.fixture(scope="module")
def random_block() -> np.ndarray:
    """Random values every full-size tensor is a view of (a model's worth of distinct values is not needed)."""
    return (0.02 * np.random.default_rng(5).standard_normal(34_000_000)).astype(np.float32)


def original_state(name: str, block: np.ndarray) -> dict[str, np.ndarray]:
    """The names and shapes of SHI-Labs' state_dict for a published model (the reference built on PyTorch's
    meta device: no memory), with views of ``block`` as values."""
    function, classes = PUBLISHED_FAMILY[name]
    published = PUBLISHED[function]
    with torch.device("meta"):
        reference = build(published["constructor"], dict(published["kwargs"], num_classes=classes))
    state = {}
    for tensor_name, tensor in reference.state_dict().items():
        if tensor_name.endswith("relative_position_index"):
            state[tensor_name] = relative_position_index(int(round(tensor.shape[0] ** 0.5)))
        else:
            state[tensor_name] = block[: tensor.numel()].reshape(tuple(tensor.shape))
    return state


@pytest.mark.parametrize("name", sorted(PUBLISHED_FAMILY))
def test_published_architectures_convert_at_full_size(name, random_block):
    original = original_state(name, random_block)
    config = config_from_registry_entry(hub.registry_entry(name))
    # the check builds the model: every tensor present, none left over, every shape right
    tensors = convert_family_state_dict(original, config, name, lambda c, t, s: _check_tensors(t, c, s, check_weights))
    prefix = config.model_type
    fused = sum(n.endswith((".qkv.weight", ".qkv.bias")) for n in original)
    stored_index = sum(n.endswith("relative_position_index") for n in original)
    assert len(tensors) == len(original) + 2 * fused - stored_index
    assert tensors["classifier.weight"].shape == (PUBLISHED_FAMILY[name][1], config.hidden_size)
    if prefix == "dinat_s":
        assert tensors["dinat_s.encoder.levels.3.layers.1.attention.self.rpb"].shape == (config.num_heads[3], 13, 13)
        assert tensors["dinat_s.encoder.levels.2.downsample.reduction.weight"].shape == (8 * config.embed_dim,
                                                                                         16 * config.embed_dim)
    else:
        span = 27 if config.attention == "global" else 13  # 14x14 tokens, or a 7x7 window
        assert tensors["nat_isotropic.encoder.layers.11.attention.self.rpb"].shape == (config.num_heads, span, span)


def test_a_published_checkpoint_file_converts_by_name(tmp_path, random_block):
    original = original_state("vitrpb-small-in1k-224", random_block)
    torch.save({name: torch.from_numpy(np.array(tensor)) for name, tensor in original.items()}, tmp_path / "vit.pth")
    out = convert_checkpoint(tmp_path / "vit.pth", tmp_path / "out", model="vitrpb-small-in1k-224")
    config = AutoConfig.from_pretrained(out)
    assert config.attention == "global" and config.num_labels == 1000 and config.id2label[0] == "tench, Tinca tinca"
    assert json.loads((out / "conversion.json").read_text())["preprocessing"]["resolution"] == 224
    with pytest.raises(ConversionError, match="holds a NATIsotropic checkpoint, but the arguments describe a DiNAT_s"):
        convert_checkpoint(tmp_path / "vit.pth", tmp_path / "again", model="dinat-s-tiny-in1k-224")
    assert not (tmp_path / "again").exists()
