"""Checkpoint conversion: original SHI-Labs and Hugging Face checkpoints to dinat-np folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinat_np import DinatForImageClassification, convert
from dinat_np.convert import (
    ConversionError,
    infer_architecture,
    load_label_set,
    original_to_hf,
    registry_config,
)
from dinat_np.modeling_auto import check_weights
from dinat_np.state_dict import read_safetensors

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

DATA = Path(__file__).parent / "data"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
ORIGINALS = {item["name"]: item for item in MANIFEST["original"]}


def convert_checkpoint(src, out_dir, **options) -> Path:
    """The converter with the model classes' weight check, as its callers pass it."""
    return convert.convert_checkpoint(src, out_dir, check_weights=check_weights, **options)


def _constructor_config(name: str) -> dict:
    """The fixture's NAT-class constructor arguments as a conversion config (NAT when no dilations)."""
    cfg = dict(ORIGINALS[name]["constructor"])
    if "dilations" not in cfg:
        cfg["model_type"] = "nat"
    return cfg


def _logits(folder: Path, pixel_values: np.ndarray) -> np.ndarray:
    return DinatForImageClassification.from_pretrained(folder)(pixel_values).logits


def _original_state(name: str) -> dict:
    return torch.load(DATA / name / "checkpoint.pth", weights_only=True)


def _raw_safetensors_header(path: Path) -> dict:
    blob = path.read_bytes()
    return json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])


# ---------------------------------------------------------------------------------------------
# acceptance: originals reproduce the reference logits


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_original_checkpoint_logits(tmp_path: Path, name: str) -> None:
    out = convert_checkpoint(DATA / name / "checkpoint.pth", tmp_path / "out", config=_constructor_config(name))
    expected = np.load(DATA / name / "expected.npz")
    logits = _logits(out, expected["pixel_values"])
    assert logits.shape == expected["logits"].shape
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    constructor = ORIGINALS[name]["constructor"]
    assert config["model_type"] == ("dinat" if "dilations" in constructor else "nat")
    assert config["num_heads"] == constructor["num_heads"] and config["kernel_size"] == constructor["kernel_size"]
    assert (config["layer_scale_init_value"] > 0) == ("layer_scale" in constructor)


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_reduced_precision_storage(tmp_path: Path, name: str) -> None:
    src, cfg = DATA / name / "checkpoint.pth", _constructor_config(name)
    pixels = np.load(DATA / name / "expected.npz")["pixel_values"]
    full = convert_checkpoint(src, tmp_path / "f32", config=cfg)
    reference = _logits(full, pixels)
    size32 = (full / "model.safetensors").stat().st_size
    for dtype, tolerance in (("float16", 1e-2), ("bfloat16", 0.25)):
        out = convert_checkpoint(src, tmp_path / dtype, config=cfg, dtype=dtype)
        assert (out / "model.safetensors").stat().st_size < 0.55 * size32
        header = _raw_safetensors_header(out / "model.safetensors")
        code = {"float16": "F16", "bfloat16": "BF16"}[dtype]
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {code, "F32"}
        assert header["classifier.weight"]["dtype"] == code
        assert header["classifier.bias"]["dtype"] == "F32"  # vectors and rpb stay float32
        diff = np.abs(_logits(out, pixels) - reference).max()
        assert 0 < diff <= tolerance, (dtype, diff)


# ---------------------------------------------------------------------------------------------
# Hugging Face sources


def test_hf_pytorch_model_bin_is_bit_identical(tmp_path: Path) -> None:
    folder = DATA / "hf_dinat_small_cfg"
    out = convert_checkpoint(folder / "pytorch_model.bin", tmp_path / "out")
    ours = read_safetensors(out / "model.safetensors", as_float32=False)
    ref = read_safetensors(folder / "model.safetensors", as_float32=False)
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype == np.float32
        assert ours[name].tobytes() == ref[name].tobytes(), name
    ours_cfg = json.loads((out / "config.json").read_text())
    ref_cfg = json.loads((folder / "config.json").read_text())
    for key in ("embed_dim", "depths", "num_heads", "kernel_size", "dilations", "mlp_ratio", "id2label", "model_type",
                "layer_scale_init_value", "hidden_size"):
        assert ours_cfg[key] == ref_cfg[key], key


@pytest.mark.parametrize("name", ["hf_dinat_small_cfg", "hf_dinat_layerscale_oddsize"])
def test_hf_folder_source(tmp_path: Path, name: str) -> None:
    out = convert_checkpoint(DATA / name, tmp_path / "out")
    expected = np.load(DATA / name / "expected.npz")
    np.testing.assert_allclose(_logits(out, expected["pixel_values"]), expected["logits"], rtol=0, atol=1e-4)


def test_hf_safetensors_without_config_needs_dilations(tmp_path: Path) -> None:
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((DATA / "hf_dinat_small_cfg" / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match="dilations"):
        convert_checkpoint(lone, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config = json.loads((DATA / "hf_dinat_small_cfg" / "config.json").read_text())
    out = convert_checkpoint(lone, tmp_path / "out", config={"dilations": config["dilations"]})
    expected = np.load(DATA / "hf_dinat_small_cfg" / "expected.npz")
    np.testing.assert_allclose(_logits(out, expected["pixel_values"]), expected["logits"], rtol=0, atol=1e-4)


def test_nat_output_reconverts_identically(tmp_path: Path) -> None:
    """A converted NAT folder (HF names with the `nat.` prefix) is itself a valid source."""
    name = "original_nat_layerscale"
    first = convert_checkpoint(DATA / name / "checkpoint.pth", tmp_path / "a", config=_constructor_config(name))
    a = read_safetensors(first / "model.safetensors", as_float32=False)
    assert any(k.startswith("nat.encoder.levels.0.layers.0.layer_scale_parameters") for k in a)
    # the weights alone say NAT (prefix), so no config is needed
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((first / "model.safetensors").read_bytes())
    second = convert_checkpoint(lone, tmp_path / "b")
    b = read_safetensors(second / "model.safetensors", as_float32=False)
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert json.loads((second / "config.json").read_text())["model_type"] == "nat"


# ---------------------------------------------------------------------------------------------
# the name table


def test_name_table_splits_qkv_and_stacks_gamma() -> None:
    rng = np.random.default_rng(11)
    dim = 8
    qkv = rng.standard_normal((3 * dim, dim)).astype(np.float32)
    g1, g2 = rng.standard_normal(dim).astype(np.float32), rng.standard_normal(dim).astype(np.float32)
    out = original_to_hf({"levels.1.blocks.2.attn.qkv.weight": qkv, "levels.1.blocks.2.gamma1": g1,
                          "levels.1.blocks.2.gamma2": g2, "head.bias": g1}, prefix="nat")
    base = "nat.encoder.levels.1.layers.2."
    np.testing.assert_array_equal(out[base + "attention.self.query.weight"], qkv[:dim])
    np.testing.assert_array_equal(out[base + "attention.self.key.weight"], qkv[dim:2 * dim])
    np.testing.assert_array_equal(out[base + "attention.self.value.weight"], qkv[2 * dim:])
    np.testing.assert_array_equal(out[base + "layer_scale_parameters"], np.stack([g1, g2]))
    np.testing.assert_array_equal(out["classifier.bias"], g1)


def test_inferred_architecture() -> None:
    sd = {k: v.numpy() for k, v in _original_state("original_nat_layerscale").items()}
    hf = original_to_hf(sd, prefix="nat")
    body = {k[4:] if k.startswith("nat.") else k: v for k, v in hf.items()}
    arch = infer_architecture(body)
    constructor = ORIGINALS["original_nat_layerscale"]["constructor"]
    assert arch["embed_dim"] == constructor["embed_dim"]
    assert arch["depths"] == constructor["depths"]
    assert arch["num_heads"] == constructor["num_heads"]
    assert arch["kernel_size"] == constructor["kernel_size"]
    assert arch["mlp_ratio"] == float(constructor["mlp_ratio"])
    assert arch["layer_scale"] is True and arch["num_labels"] == constructor["num_classes"]


# ---------------------------------------------------------------------------------------------
# errors: clear messages, nothing written


def test_missing_dilations_lists_what_was_inferred(tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(DATA / "original_dinat_small_cfg" / "checkpoint.pth", tmp_path / "out")
    message = str(info.value)
    for part in ("embed_dim=16", "depths=[2, 2, 2, 1]", "num_heads=[1, 2, 2, 4]", "kernel_size=5",
                 "num_labels=10", "dilations", "--model", "--config"):
        assert part in message, part
    assert not (tmp_path / "out").exists()


def test_registry_architecture_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(DATA / "original_dinat_small_cfg" / "checkpoint.pth", tmp_path / "out",
                           model="dinat-mini-in1k-224")
    message = str(info.value)
    assert "embed_dim: the weights have 16, registry entry 'dinat-mini-in1k-224' says 64" in message
    assert "num_labels" in message or "labels" in message
    assert not (tmp_path / "out").exists()


def _save_modified(tmp_path: Path, change) -> Path:
    sd = _original_state("original_dinat_small_cfg")
    change(sd)
    path = tmp_path / "modified.pth"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda sd: sd.pop("levels.1.blocks.0.mlp.fc2.bias"),
         r"missing \(1\): dinat\.encoder\.levels\.1\.layers\.0\.output\.dense\.bias"),
        (lambda sd: sd.pop("levels.2.downsample.reduction.weight"),
         r"missing \(1\): dinat\.encoder\.levels\.2\.downsample"),
        (lambda sd: sd.__setitem__("levels.0.blocks.1.mlp.fc2.weight", torch.randn(16, 31)),
         r"wrong shape \(1\): dinat\.encoder\.levels\.0\.layers\.1\.output\.dense\.weight "
         r"\(16, 31\) != expected \(16, 32\)"),
        (lambda sd: sd.__setitem__("levels.3.blocks.0.attn.rpb", torch.randn(4, 7, 7)), r"kernel size"),
        (lambda sd: sd.__setitem__("levels.1.blocks.1.attn.rpb", torch.randn(3, 9, 9)), r"level 1: layers disagree"),
        (lambda sd: sd.__setitem__("levels.0.blocks.0.attn.qkv.weight", torch.randn(47, 16)), r"fused q/k/v"),
        (lambda sd: sd.__setitem__("levels.0.blocks.0.attn.relative_position_index", torch.zeros(3)),
         r"no DiNAT/NAT counterpart: levels\.0\.blocks\.0\.attn\.relative_position_index"),
        (lambda sd: sd.pop("levels.0.blocks.0.attn.rpb"),
         r"missing tensor 'encoder\.levels\.0\.layers\.0\.attention\.self\.rpb'"),
        (lambda sd: sd["norm.weight"].__setitem__(3, float("nan")), r"NaN/inf.*dinat\.layernorm\.weight"),
    ],
)
def test_broken_checkpoints_give_clear_errors(tmp_path: Path, change, pattern: str) -> None:
    src = _save_modified(tmp_path, change)
    with pytest.raises(ConversionError, match=pattern):
        convert_checkpoint(src, tmp_path / "out", config=_constructor_config("original_dinat_small_cfg"))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left behind"


def test_wrapped_and_prefixed_checkpoint(tmp_path: Path) -> None:
    sd = _original_state("original_dinat_small_cfg")
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 300}, path)
    cfg = _constructor_config("original_dinat_small_cfg")
    plain = convert_checkpoint(DATA / "original_dinat_small_cfg" / "checkpoint.pth", tmp_path / "plain", config=cfg)
    wrapped = convert_checkpoint(path, tmp_path / "wrapped", config=cfg)
    a = read_safetensors(plain / "model.safetensors")
    b = read_safetensors(wrapped / "model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_bfloat16_source_checkpoint(tmp_path: Path) -> None:
    """A bf16 .pth converts; stored back as bf16 it keeps exactly the same bits."""
    sd = {k: v.bfloat16() for k, v in _original_state("original_nat_layerscale").items()}
    path = tmp_path / "bf16.pth"
    torch.save(sd, path)
    cfg = _constructor_config("original_nat_layerscale")
    out = convert_checkpoint(path, tmp_path / "out", config=cfg, dtype="bfloat16")
    from safetensors.torch import load_file

    stored = load_file(out / "model.safetensors")
    src = sd["levels.2.blocks.1.mlp.fc1.weight"]
    assert stored["nat.encoder.levels.2.layers.1.intermediate.dense.weight"].dtype == torch.bfloat16
    assert torch.equal(stored["nat.encoder.levels.2.layers.1.intermediate.dense.weight"], src)
    assert torch.equal(stored["nat.encoder.levels.2.layers.1.intermediate.dense.bias"],
                       sd["levels.2.blocks.1.mlp.fc1.bias"].float())


def test_damaged_sources(tmp_path: Path) -> None:
    blob = (DATA / "hf_dinat_small_cfg" / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        convert_checkpoint(cut, tmp_path / "out")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    with pytest.raises(ConversionError, match="not valid JSON"):
        convert_checkpoint(junk, tmp_path / "out")
    pth = (DATA / "original_dinat_small_cfg" / "checkpoint.pth").read_bytes()
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(pth[:-5000])
    with pytest.raises(ConversionError, match="damaged or truncated"):
        convert_checkpoint(cut_pth, tmp_path / "out", config=_constructor_config("original_dinat_small_cfg"))
    with pytest.raises(ConversionError, match="does not exist"):
        convert_checkpoint(tmp_path / "nothing.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_folder(tmp_path: Path) -> None:
    cfg = _constructor_config("original_nat_layerscale")
    src = DATA / "original_nat_layerscale" / "checkpoint.pth"
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    convert_checkpoint(src, out, config=cfg)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(src, out, config=cfg, dtype="float16")
    assert (out / "model.safetensors").read_bytes() == before
    convert_checkpoint(src, out, config=cfg, dtype="float16", overwrite=True)
    assert len((out / "model.safetensors").read_bytes()) < 0.55 * len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------
# labels


def test_imagenet_label_sets() -> None:
    in1k = load_label_set("imagenet1k")
    assert len(in1k) == 1000 and in1k[0] == "tench, Tinca tinca" and in1k[281] == "tabby, tabby cat"
    assert len(load_label_set("imagenet22k")) == 21841
    cfg = registry_config({"name": "x", "model_type": "dinat", "architecture": {}, "label_set": "imagenet1k"})
    assert cfg["id2label"]["281"] == "tabby, tabby cat" and len(cfg["id2label"]) == 1000


def test_registry_labels_fill_config(tmp_path: Path) -> None:
    """A 1000-class head converted through a registry entry gets the ImageNet-1k names."""
    sd = _original_state("original_nat_layerscale")
    gen = torch.Generator().manual_seed(5)
    sd["head.weight"] = torch.randn(1000, 128, generator=gen) * 0.02
    sd["head.bias"] = torch.randn(1000, generator=gen) * 0.02
    path = tmp_path / "in1k.pth"
    torch.save(sd, path)
    constructor = ORIGINALS["original_nat_layerscale"]["constructor"]
    registry = {"models": {"tiny-nat-in1k": {
        "model_type": "nat", "label_set": "imagenet1k", "url": "http://127.0.0.1:9/x.pth",
        "architecture": {k: constructor[k] for k in ("embed_dim", "depths", "num_heads", "kernel_size", "mlp_ratio")},
    }}}
    out = convert_checkpoint(path, tmp_path / "out", model="tiny-nat-in1k", registry=registry)
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 1000 and config["id2label"]["281"] == "tabby, tabby cat"
    assert config["label2id"]["tench, Tinca tinca"] == 0
    assert json.loads((out / "conversion.json").read_text())["registry_name"] == "tiny-nat-in1k"


# ---------------------------------------------------------------------------------------------
# the dinat-convert command


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinat_np.cli.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_success_and_failures(tmp_path: Path) -> None:
    name = "original_dinat_small_cfg"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(_constructor_config(name)))
    ok = _cli(DATA / name / "checkpoint.pth", tmp_path / "good", "--config", config_path, "--dtype", "float16")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "good" / "config.json").is_file() and (tmp_path / "good" / "model.safetensors").is_file()

    failures = [
        ((DATA / name / "checkpoint.pth", tmp_path / "bad1"), "dilations"),  # nothing tells the dilations
        ((tmp_path / "absent.pth", tmp_path / "bad2"), "does not exist"),
        ((DATA / name / "expected.npz", tmp_path / "bad3", "--config", config_path), "not a torch.save checkpoint"),
        ((DATA / name / "checkpoint.pth", tmp_path / "bad4", "--model", "no-such-model"), "unknown model"),
        ((DATA / name / "checkpoint.pth", tmp_path / "good", "--config", config_path), "not empty"),
    ]
    for args, message in failures:
        result = _cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert "dinat-convert: error:" in result.stderr and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "good"]

    usage = _cli(DATA / name / "checkpoint.pth", tmp_path / "x", "--model", "a", "--config", config_path)
    assert usage.returncode == 2 and "not allowed with" in usage.stderr
    listing = _cli("--list")
    assert listing.returncode == 0 and "dinat-large-11x11-in22k-in1k-384" in listing.stdout


def test_cli_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dinat_np.cli.convert import main

    assert main([str(DATA / "hf_dinat_small_cfg"), str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert main([str(DATA / "hf_dinat_small_cfg" / "expected.npz"), str(tmp_path / "p")]) == 1
    assert "error" in capsys.readouterr().err


def test_converted_folder_is_readable_by_others(tmp_path: Path) -> None:
    import os
    import stat

    out = tmp_path / "out"
    src = DATA / "hf_dinat_small_cfg" / "model.safetensors"
    old_mask = os.umask(0o022)
    try:
        convert_checkpoint(src, out, config=DATA / "hf_dinat_small_cfg" / "config.json")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
