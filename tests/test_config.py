"""DinatConfig: HF fields and defaults, config.json round trips, NAT configs, validation."""

from __future__ import annotations

import json

import pytest

from dinat_np import DinatConfig

from tests.helpers import DATA

HF_FIELDS = [
    "patch_size", "num_channels", "embed_dim", "depths", "num_heads", "kernel_size", "dilations", "mlp_ratio",
    "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "hidden_act",
    "initializer_range", "layer_norm_eps", "layer_scale_init_value", "out_features", "out_indices",
    "id2label", "label2id", "num_labels", "problem_type", "stage_names", "hidden_size", "num_layers",
]


@pytest.mark.torch
def test_defaults_equal_transformers():
    transformers = pytest.importorskip("transformers")
    ours, theirs = DinatConfig(), transformers.DinatConfig()
    for field in HF_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.torch
def test_reads_and_writes_hf_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = DATA / "hf_dinat_layerscale_oddsize"
    config = DinatConfig.from_pretrained(folder)
    assert config.layer_scale_init_value == 0.1 and config.dilations == [[2], [1, 3], [1, 2], [1]]
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    for key, value in original.items():
        if key not in ("transformers_version", "torch_dtype"):
            assert written[key] == value, key
    # transformers itself reads what we write.
    theirs = transformers.DinatConfig.from_pretrained(tmp_path)
    for field in HF_FIELDS:
        assert getattr(theirs, field) == getattr(config, field), field
    assert DinatConfig.from_pretrained(tmp_path) == config
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.torch
def test_nat_config_has_unit_dilations(tmp_path):
    transformers = pytest.importorskip("transformers")
    nat = transformers.NatConfig(embed_dim=32, depths=[1, 2, 1, 1], num_heads=[1, 2, 4, 8], num_labels=3)
    nat.save_pretrained(tmp_path)
    config = DinatConfig.from_pretrained(tmp_path)
    assert config.model_type == "nat" and config.weights_prefix == "nat"
    assert config.dilations == [[1], [1, 1], [1], [1]] and config.num_labels == 3
    assert "dilations" not in config.to_dict()


def test_backbone_outputs_follow_hf_alignment():
    assert DinatConfig(out_indices=[1, 3]).out_features == ["stage1", "stage3"]
    assert DinatConfig(out_features=["stem", "stage4"]).out_indices == [0, 4]
    with pytest.raises(ValueError, match="out_features"):
        DinatConfig(out_features=["stage9"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"patch_size": 2}, "patch_size"),
        ({"embed_dim": 30, "num_heads": [4, 4, 4, 4]}, "num_heads"),
        ({"dilations": [[1], [1], [1], [1]]}, "dilations"),
        ({"kernel_size": 6}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"depths": [2, 2], "num_heads": [2, 4, 8, 16]}, "num_heads"),
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"model_type": "swin"}, "model_type"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DinatConfig(**kwargs)


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DinatConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        DinatConfig.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"mlp_ratio": "2"}, "mlp_ratio"),
        ({"depths": 3}, "depths"),
        ({"num_heads": 2}, "num_heads"),
        ({"dilations": [1, 2, 3, 4]}, "dilations"),
        ({"layer_norm_eps": None}, "layer_norm_eps"),
        ({"layer_scale_init_value": None}, "layer_scale_init_value"),
        ({"id2label": ["cat", "dog"]}, "id2label"),
        ({"num_labels": "3"}, "num_labels"),
        ({"hidden_act": ["gelu"]}, "hidden_act"),
        ({"out_features": "stage1"}, "out_features"),
    ],
)
def test_malformed_config_json_values_are_value_errors(tmp_path, change, field):
    data = json.loads((DATA / "hf_dinat_small_cfg" / "config.json").read_text())
    data.update(change)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=field):
        DinatConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"embed_dim": 10**8}, r"embed_dim: must be an integer from 2 to 65536"),
        ({"embed_dim": 1e8}, r"embed_dim: must be an integer from 2 to 65536, got 100000000.0"),
        ({"num_channels": 10**9}, r"num_channels: must be an integer from 1 to 1024"),
        ({"mlp_ratio": 1e308}, r"mlp_ratio: must be above 0 and at most 64"),
        ({"mlp_ratio": float("inf")}, r"mlp_ratio: must be a finite number"),
        ({"layer_norm_eps": float("nan")}, r"layer_norm_eps: must be a finite number, got nan"),
        ({"layer_scale_init_value": float("inf")}, r"layer_scale_init_value: must be a finite number"),
        ({"kernel_size": 1001}, r"kernel_size: must be an integer from 1 to 127"),
        ({"depths": [3, 4, 6, 10**12]}, r"depths: stage 3: must be an integer from 1 to 1024"),
        ({"model_type": "nat", "depths": [10**12], "num_heads": [2]}, r"depths: stage 0"),
        ({"dilations": [[1, 10**9, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]},
         r"dilations: every dilation"),
        ({"num_labels": 10**9}, r"num_labels: must be an integer from 0 to 100000"),
        ({"id2label": {"x": "cat"}}, r"id2label: keys must be class indices"),
        ({"embed_dim": 8192}, r"describes a model of 317,600,727,816 parameters, above the limit of 2,000,000,000"),
    ],
)
def test_ranges_are_checked_before_anything_is_allocated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DinatConfig(**kwargs)


def test_parameter_count_is_that_of_the_model():
    from dinat_np import DinatForImageClassification, DinatModel

    for config in (
        DinatConfig(embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], kernel_size=3,
                    dilations=[[1], [2, 1], [1], [1]], num_labels=7),
        DinatConfig(model_type="nat", embed_dim=24, depths=[2, 1], num_heads=[2, 3], kernel_size=5, mlp_ratio=2.5,
                    qkv_bias=False, layer_scale_init_value=0.1, num_channels=5, num_labels=0),
    ):
        with_head = DinatForImageClassification(config, seed=1).state_dict()
        base = DinatModel(config, seed=1).state_dict()
        assert config.parameter_count() == sum(t.size for t in with_head.values())
        assert config.parameter_count(head=False) == sum(t.size for t in base.values())


@pytest.mark.parametrize("text, message", [
    ('{"layer_norm_eps": NaN}', "NaN is not a JSON number"),
    ('{"mlp_ratio": Infinity}', "Infinity is not a JSON number"),
    ('{"mlp_ratio": 1e400}', "1e400 is too large for a 64-bit float"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_json_without_numbers_python_would_invent(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        DinatConfig.from_pretrained(tmp_path)


def test_oversized_json_is_not_read(tmp_path, monkeypatch):
    from dinat_np import configuration

    monkeypatch.setattr(configuration, "MAX_JSON_BYTES", 1000)
    (tmp_path / "config.json").write_text(json.dumps({"extra": "x" * 2000}))
    with pytest.raises(ValueError, match="larger than 1,000 bytes"):
        DinatConfig.from_pretrained(tmp_path)
