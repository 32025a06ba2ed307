"""DinatSConfig and NatIsotropicConfig (defaults of SHI-Labs' constructors, config.json round trips,
validation) and AutoConfig choosing the class of every family member by model_type."""

from __future__ import annotations

import json

import pytest

from dinat_np import AutoConfig, DinatConfig, DinatSConfig, NatIsotropicConfig

from tests.helpers import DATA


def test_dinat_s_defaults_are_those_of_the_original_constructor():
    config = DinatSConfig()
    assert (config.patch_size, config.embed_dim) == (4, 96)
    assert (config.depths, config.num_heads) == ([2, 2, 6, 2], [3, 6, 12, 24])
    assert config.kernel_size == 7 and config.mlp_ratio == 4.0 and config.qkv_bias and config.patch_norm
    assert config.dilations == [[1, 1], [1, 1], [1] * 6, [1, 1]]  # DiNAT_s(dilations=None)
    assert config.hidden_size == 768 and config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert config.out_features == ["stage4"] and config.weights_prefix == "dinat_s"


def test_isotropic_defaults_alternate_dilation_and_global_attention_has_no_window():
    config = NatIsotropicConfig(depth=5)
    assert config.attention == "neighborhood" and config.kernel_size == 7
    assert config.dilations == [1, 2, 1, 2, 1]  # NATIsotropic(dilation=2): even layers 1
    vit = NatIsotropicConfig(attention="global", image_size=96, patch_size=16)
    assert vit.kernel_size is None and vit.dilations is None and vit.grid_size == 6
    assert NatIsotropicConfig(image_size=100, patch_size=16).grid_size == 6  # as img_size // patch_size


@pytest.mark.parametrize(
    "config",
    [
        DinatSConfig(embed_dim=16, depths=[2, 1], num_heads=[1, 2], kernel_size=5, dilations=[[1, 4], [2]],
                     num_labels=3, out_indices=[1, 2], patch_norm=False, mlp_ratio=1.5),
        NatIsotropicConfig(embed_dim=32, depth=3, num_heads=2, dilations=[1, 3, 1], id2label={0: "cat", 1: "dog"}),
        NatIsotropicConfig(attention="global", image_size=96, embed_dim=32, depth=2, num_heads=2, num_labels=0),
    ],
    ids=["dinat_s", "nat_isotropic", "vit_rpb"],
)
def test_config_json_round_trip_through_auto_config(config, tmp_path):
    config.extra["custom_key"] = {"kept": True}
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == config.model_type and written["architectures"] == [config.architecture]
    assert written["custom_key"] == {"kept": True}
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is type(config) and again == config
    assert "hidden_size" not in again.extra  # derived fields are not read back as extra keys
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("folder", ["hf_dinat_small_cfg", "hf_dinat_layerscale_oddsize"])
def test_auto_config_reads_dinat_folders_as_dinat_config(folder):
    config = AutoConfig.from_pretrained(DATA / folder)
    assert type(config) is DinatConfig and config == DinatConfig.from_pretrained(DATA / folder)


def test_auto_config_for_every_model_type():
    assert AutoConfig.for_model("nat", depths=[1, 1], num_heads=[1, 2], embed_dim=8).model_type == "nat"
    assert type(AutoConfig.for_model("dinat")) is DinatConfig
    assert type(AutoConfig.for_model("dinat_s")) is DinatSConfig
    assert type(AutoConfig.for_model("nat_isotropic", attention="global")) is NatIsotropicConfig


def test_auto_config_refuses_unknown_model_types_and_reads_none_as_dinat():
    with pytest.raises(ValueError, match="'vit' is not a model dinat-np knows"):
        AutoConfig.from_dict({"model_type": "vit"})
    assert AutoConfig.from_dict({"embed_dim": 32}) == DinatConfig(embed_dim=32)  # as DinatConfig always read it


def test_a_class_refuses_another_model_type_and_names_auto_config(tmp_path):
    DinatSConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        DinatConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="AutoConfig reads a 'dinat' config"):
        DinatSConfig(model_type="dinat")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: DinatSConfig(depths=[2, 1], num_heads=[1, 2], dilations=[[1], [1]]), "dilations"),
        (lambda: DinatSConfig(embed_dim=10, depths=[1], num_heads=[3]), "num_heads"),
        (lambda: DinatSConfig(kernel_size=4), "kernel_size"),
        (lambda: DinatSConfig(dilations=[[1, 0], [1, 1], [1] * 6, [1, 1]]), "dilations"),
        (lambda: DinatSConfig(patch_size=0), "patch_size"),
        (lambda: DinatSConfig(hidden_act="swish"), "hidden_act"),
        (lambda: DinatSConfig(mlp_ratio=-1.0), "mlp_ratio"),
        (lambda: DinatSConfig(layer_norm_eps=float("nan")), "layer_norm_eps"),
        (lambda: DinatSConfig(out_features=["stage9"]), "out_features"),
        (lambda: NatIsotropicConfig(depth=3, dilations=[1, 2]), "dilations"),
        (lambda: NatIsotropicConfig(attention="local"), "attention"),
        (lambda: NatIsotropicConfig(attention="global", kernel_size=7), "kernel_size"),
        (lambda: NatIsotropicConfig(attention="global", image_size=8, patch_size=16), "image_size"),
        (lambda: NatIsotropicConfig(patch_norm="yes"), "patch_norm"),
        # bounded before anything is allocated (docs/limits.md)
        (lambda: NatIsotropicConfig(image_size=10**8), "image_size"),
        (lambda: NatIsotropicConfig(depth=10**6), "depth"),
        (lambda: NatIsotropicConfig(depth=10**12), "depth"),  # refused before its dilations are built
        (lambda: NatIsotropicConfig(embed_dim=60000, num_heads=1), "depths"),  # ~4e10 parameters
        (lambda: DinatSConfig(embed_dim=10**8), "embed_dim"),
        (lambda: DinatSConfig(mlp_ratio=1e308), "mlp_ratio"),
        (lambda: DinatSConfig(kernel_size=1001), "kernel_size"),
        (lambda: DinatSConfig(num_channels=10**9), "num_channels"),
        (lambda: DinatSConfig(depths=[1] * 9, num_heads=[1] * 9), "depths"),
        # its default dilations are not built for such depths: a list of 10**9 ones would take 8 GB
        (lambda: DinatSConfig(depths=[10**9, 2, 2, 2]), "depths"),
        (lambda: DinatSConfig(depths=[10**12]), "depths"),
    ],
)
def test_invalid_fields_are_named(make, field):
    with pytest.raises(ValueError, match=rf"Config\.{field}"):
        make()
