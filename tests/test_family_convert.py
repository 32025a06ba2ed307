"""Conversion of SHI-Labs' DiNAT_s / NATIsotropic checkpoints: their constructor arguments to configs,
their tensor names to the engine's, ViT-rpb's stored index, and the registry's 12 published models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinat_np.configuration_family import DinatSConfig, NatIsotropicConfig
from dinat_np.convert import ConversionError
from dinat_np.convert_family import (
    _canonical_bias_table,
    config_from_original_args,
    config_from_registry_entry,
    convert_family_state_dict,
    family_config,
    family_original_to_hf,
    relative_position_index,
)
from dinat_np.hub import load_registry, registry_entry
from dinat_np.torch_pickle import load_torch_checkpoint

from tests.helpers import DATA
from tests.helpers.family import PUBLISHED_FAMILY

FAMILY = DATA / "family"
FIXTURES = {item["name"]: item for item in json.loads((FAMILY / "manifest.json").read_text())["models"]}
PUBLISHED = json.loads((FAMILY / "published.json").read_text())["models"]


def original_args(name: str) -> dict:
    return {"constructor": FIXTURES[name]["constructor"], "kwargs": FIXTURES[name]["kwargs"]}


def original_tensors(name: str) -> dict[str, np.ndarray]:
    return load_torch_checkpoint(FAMILY / name / "checkpoint.pth")


# ---------------------------------------------------------------------------------------------
# constructor arguments -> configs


def test_dinat_s_arguments_become_a_dinat_s_config():
    config = config_from_original_args(original_args("original_dinat_s_cfg"))
    assert isinstance(config, DinatSConfig)
    assert config.embed_dim == 16 and config.depths == [2, 2, 2, 1] and config.num_heads == [1, 2, 2, 4]
    assert config.kernel_size == 5 and config.dilations == [[1, 4], [1, 2], [1, 1], [1]]
    assert config.mlp_ratio == 2 and config.num_labels == 10 and config.patch_size == 4


def test_isotropic_arguments_alternate_the_dilation_and_vitrpb_is_global_attention():
    nat = config_from_original_args(original_args("original_dinat_isotropic_cfg"))
    assert isinstance(nat, NatIsotropicConfig) and nat.attention == "neighborhood"
    assert nat.dilations == [1, 2, 1, 2] and nat.kernel_size == 5 and nat.patch_size == 8 and nat.image_size == 112
    vit = config_from_original_args(original_args("original_vitrpb_cfg"))
    assert vit.attention == "global" and vit.kernel_size is None and vit.grid_size == 6


def test_arguments_read_from_a_json_file_with_a_label_set(tmp_path):
    path = tmp_path / "args.json"
    kwargs = dict(FIXTURES["original_vitrpb_cfg"]["kwargs"], num_classes=1000)
    path.write_text(json.dumps({"constructor": "NATIsotropic", "kwargs": kwargs, "label_set": "imagenet1k"}))
    config = config_from_original_args(path)
    assert config.num_labels == 1000 and config.id2label[0] == "tench, Tinca tinca"


@pytest.mark.parametrize(
    "args, message",
    [
        ({"constructor": "NAT", "kwargs": {}}, "constructor"),
        ({"constructor": "DiNAT_s", "kwargs": {"window": 7}}, r"no argument\(s\) \['window'\]"),
        ({"constructor": "DiNAT_s", "kwargs": [1]}, "kwargs"),
        ({"constructor": "DiNAT_s", "kwargs": {}, "model": "x"}, "unknown keys"),
        ({"constructor": "DiNAT_s", "kwargs": {"dilations": [[1], [1], [1], [1]]}}, "dilations"),
        ({"constructor": "NATIsotropic", "kwargs": {"layer": "SwinLayer"}}, "layer must be one of"),
        ({"constructor": "NATIsotropic", "kwargs": {"dilation": None}}, "dilations"),
        ({"constructor": "NATIsotropic", "kwargs": {"num_classes": 5}, "label_set": "imagenet1k"},
         "names 1000 classes"),
        ({"constructor": "DiNAT_s", "kwargs": {"qk_scale": 0.1}}, "qk_scale 0.1 is not supported"),
    ],
)
def test_bad_arguments_are_explained(args, message):
    with pytest.raises(ConversionError, match=message):
        config_from_original_args(args)


def test_training_only_arguments_are_accepted():
    config = config_from_original_args({"constructor": "DiNAT_s", "kwargs": {"drop_rate": 0.1, "drop_path_rate": 0.3}})
    assert config.drop_path_rate == 0.3


def test_bad_json_file_is_explained(tmp_path):
    path = tmp_path / "args.json"
    path.write_text("{not json")
    with pytest.raises(ConversionError, match="not valid JSON"):
        config_from_original_args(path)
    with pytest.raises(ConversionError, match="does not exist"):
        config_from_original_args(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# tensor names


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_original_tensor_lands_under_an_engine_name(name):
    tensors = original_tensors(name)
    config = config_from_original_args(original_args(name))
    renamed = family_original_to_hf(tensors, config)
    prefix = config.model_type
    assert all(n.startswith((f"{prefix}.", "classifier.")) for n in renamed)
    # q, k, v are the thirds of the fused projection, in that order.
    layer = f"{prefix}.encoder.levels.0.layers.0" if prefix == "dinat_s" else f"{prefix}.encoder.layers.0"
    fused_name = "layers.0.blocks.0.attn.qkv.weight" if prefix == "dinat_s" else "layers.0.attn.qkv.weight"
    fused = tensors[fused_name]
    dim = fused.shape[1]
    for k, part in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(renamed[f"{layer}.attention.self.{part}.weight"], fused[k * dim:(k + 1) * dim])
    np.testing.assert_array_equal(renamed[f"{prefix}.embeddings.patch_embeddings.projection.weight"],
                                  tensors["patch_embed.proj.weight"])
    np.testing.assert_array_equal(renamed["classifier.weight"], tensors["head.weight"])
    np.testing.assert_array_equal(renamed[f"{prefix}.layernorm.bias"], tensors["norm.bias"])
    # Every tensor kept (3 per fused projection); ViT-rpb's stored index is consumed.
    fused_count = sum(n.endswith((".qkv.weight", ".qkv.bias")) for n in tensors)
    index_count = sum(n.endswith("relative_position_index") for n in tensors)
    assert len(renamed) == len(tensors) + 2 * fused_count - index_count
    if prefix == "dinat_s":
        np.testing.assert_array_equal(renamed["dinat_s.encoder.levels.0.downsample.reduction.weight"],
                                      tensors["layers.0.downsample.reduction.weight"])


def test_a_checkpoint_of_another_constructor_is_refused():
    tensors = original_tensors("original_dinat_isotropic_cfg")
    with pytest.raises(ConversionError, match="not part of a dinat_s model"):
        family_original_to_hf(tensors, config_from_original_args(original_args("original_dinat_s_cfg")))
    vit = original_tensors("original_vitrpb_cfg")
    with pytest.raises(ConversionError, match="belongs to ViT-rpb layers"):
        family_original_to_hf(vit, config_from_original_args(original_args("original_dinat_isotropic_cfg")))


def test_a_nat_checkpoint_with_family_arguments_is_named_as_such():
    dinat = load_torch_checkpoint(DATA / "original_dinat_small_cfg" / "checkpoint.pth")
    config = config_from_original_args(original_args("original_dinat_s_cfg"))
    with pytest.raises(ConversionError, match="holds a NAT / DiNAT checkpoint"):
        convert_family_state_dict(dinat, config, "dinat.pth", check_weights=None)


def test_without_arguments_a_family_checkpoint_asks_for_them():
    for name in FIXTURES:
        with pytest.raises(ConversionError, match="--original-args"):
            family_config(original_tensors(name), source=name)
    dinat = load_torch_checkpoint(DATA / "original_dinat_small_cfg" / "checkpoint.pth")
    assert family_config(dinat) is None  # a DiNAT checkpoint takes the DiNAT path


def test_the_stored_vitrpb_index_is_the_canonical_one():
    tensors = original_tensors("original_vitrpb_cfg")
    for name, index in tensors.items():
        if name.endswith("relative_position_index"):
            np.testing.assert_array_equal(index, relative_position_index(6))


def test_a_relabelled_vitrpb_index_is_honoured_and_a_broken_one_refused():
    rng = np.random.default_rng(3)
    length, heads = 4, 2
    table = rng.standard_normal((heads, 2 * length - 1, 2 * length - 1)).astype(np.float32)
    transposed = relative_position_index(length).T  # an index made for query minus key
    reordered = _canonical_bias_table(table, transposed, "rpb")
    # The bias each (query, key) pair gets is the one the stored index gave it.
    flat, canonical = table.reshape(heads, -1), relative_position_index(length)
    np.testing.assert_array_equal(reordered.reshape(heads, -1)[:, canonical], flat[:, transposed])
    broken = canonical.copy()
    broken[0, 1] = broken[0, 2]
    with pytest.raises(ConversionError, match="does not give each relative offset one entry"):
        _canonical_bias_table(table, broken, "rpb")
    with pytest.raises(ConversionError, match="shape"):
        _canonical_bias_table(table, canonical[:3], "rpb")


# ---------------------------------------------------------------------------------------------
# the registry's published models


def test_the_registry_lists_the_twelve_published_models():
    family = {name for name, entry in load_registry().items()
              if entry.get("model_type") in ("dinat_s", "nat_isotropic")}
    assert family == set(PUBLISHED_FAMILY)


@pytest.mark.parametrize("name", sorted(PUBLISHED_FAMILY))
def test_registry_entries_match_the_original_constructor_arguments(name):
    function, num_classes = PUBLISHED_FAMILY[name]
    published = PUBLISHED[function]
    entry = registry_entry(name)
    assert entry["url"] == published["url"] and entry["num_labels"] == num_classes
    from_entry = config_from_registry_entry(entry)
    from_args = config_from_original_args(
        {"constructor": published["constructor"], "kwargs": dict(published["kwargs"], num_classes=num_classes),
         "label_set": entry["label_set"]}
    )
    ours, theirs = from_entry.to_dict(), from_args.to_dict()
    for dictionary in (ours, theirs):
        dictionary.pop("drop_path_rate")  # training metadata
    assert ours == theirs
    assert entry["preprocessing"]["resolution"] == (384 if name.endswith("384") else 224)
    assert entry["preprocessing"]["crop_pct"] == (1.0 if name.endswith("384") else 0.875)
