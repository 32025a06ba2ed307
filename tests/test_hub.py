"""Registry, download and cache, against a local HTTP server (no test touches a real host)."""

from __future__ import annotations

import hashlib
import socket
import json
from pathlib import Path

import numpy as np
import pytest

from dinat_np import DinatConfig, DinatForImageClassification, hub, registry
from dinat_np.convert import ConversionError, registry_config
from dinat_np.modeling_auto import check_weights

from tests.helpers import http_file_server

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "original_dinat_small_cfg" / "checkpoint.pth"
EXPECTED = DATA / "original_dinat_small_cfg" / "expected.npz"
CONSTRUCTOR = json.loads((DATA / "manifest.json").read_text())["original"][0]["constructor"]


@pytest.fixture()
def server():
    files = {"checkpoint.pth": CHECKPOINT.read_bytes(), "page.pth": b"<html>not a checkpoint</html>" * 10}
    with http_file_server(files) as httpd:
        yield httpd


def resolve(name, **options) -> Path:
    return hub.resolve_model(name, check_weights=check_weights, **options)


def _registry(url: str, sha256: str | None = None) -> dict:
    entry = {
        "model_type": "dinat",
        "description": "tiny test model",
        "architecture": {k: CONSTRUCTOR[k] for k in ("embed_dim", "depths", "num_heads", "kernel_size",
                                                     "dilations", "mlp_ratio")},
        "url": url,
        "hf_repo": None,  # the original checkpoint only: tests/test_hub_sources.py serves the Hub
        "label_set": None,
        "sha256": sha256,
        "preprocessing": {"resolution": 160, "crop_pct": 0.875, "interpolation": "bicubic",
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    return {"models": {"tiny-dinat": entry}}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in (hub.ENV_OFFLINE, hub.ENV_BASE_URL, registry.ENV_REGISTRY):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(hub.ENV_HOME, str(tmp_path / "home"))


def _leftovers(root: Path) -> list[str]:
    """What a run left in the cache, apart from its lock files."""
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    return [name for name in found if not name.startswith(".locks")]


def test_download_convert_and_cache(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = _registry(server.url + "/checkpoint.pth")
    folder = resolve("tiny-dinat", registry=registry)
    home = tmp_path / "home"
    assert folder == home / "tiny-dinat"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "Downloading tiny-dinat" in capsys.readouterr().err

    digest = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    record = json.loads((home / "downloads" / "checkpoint.pth.json").read_text())
    assert record["sha256"] == digest and record["size"] == CHECKPOINT.stat().st_size
    assert json.loads((folder / "conversion.json").read_text())["sha256"] == digest
    assert not list(home.rglob("*.part")) and not list(home.glob(".tiny-dinat*"))

    expected = np.load(EXPECTED)
    logits = DinatForImageClassification.from_pretrained(folder)(expected["pixel_values"]).logits
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)

    # cached: no second request
    assert resolve("tiny-dinat", registry=registry) == folder
    assert len(server.requests) == 1


def test_registry_file_from_environment(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(_registry("https://checkpoints.invalid/some/where/checkpoint.pth")))
    monkeypatch.setenv(registry.ENV_REGISTRY, str(path))
    monkeypatch.setenv(hub.ENV_BASE_URL, server.url)  # mirror: BASE_URL/<file name>
    model = DinatForImageClassification.from_pretrained("tiny-dinat")
    assert model.config.embed_dim == CONSTRUCTOR["embed_dim"]
    assert server.requests == ["/checkpoint.pth"]


def test_cut_transfer_leaves_nothing_complete(server, tmp_path: Path) -> None:
    registry = _registry(server.url + "/cut/checkpoint.pth")
    with pytest.raises(hub.DownloadError) as info:
        resolve("tiny-dinat", registry=registry, progress=False)
    assert "interrupted" in str(info.value) and f"of {CHECKPOINT.stat().st_size} bytes" in str(info.value)
    assert _leftovers(tmp_path / "home") == ["downloads"]  # no partial file, no model folder
    # a later complete transfer works
    server.files["checkpoint.pth"] = CHECKPOINT.read_bytes()
    registry["models"]["tiny-dinat"]["url"] = server.url + "/checkpoint.pth"
    assert (resolve("tiny-dinat", registry=registry, progress=False) / "model.safetensors").is_file()


def test_stalled_transfer_reports_the_bytes_received(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1000 bytes arrive, then nothing: the timeout's message counts them (a 1 MiB read once lost them)."""
    monkeypatch.setattr(hub, "_TIMEOUT", 1.0)
    registry = _registry(server.url + "/stall/checkpoint.pth")
    with pytest.raises(hub.DownloadError, match="interrupted after 1000 bytes"):
        resolve("tiny-dinat", registry=registry, progress=False)
    assert _leftovers(tmp_path / "home") == ["downloads"]


def test_stale_partial_download_is_swept(server, tmp_path: Path) -> None:
    """A killed download's .part file (its writer is gone) is removed by the next download of that file."""
    from dinat_np import staging

    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    stale = downloads / f".checkpoint.pth.{staging._HOST}.999999999.abcd1234.part"
    stale.write_bytes(b"half a checkpoint")
    resolve("tiny-dinat", registry=_registry(server.url + "/checkpoint.pth"), progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in downloads.iterdir()) == ["checkpoint.pth", "checkpoint.pth.json"]


def test_offline_error(server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    url = server.url + "/checkpoint.pth"
    with pytest.raises(hub.WeightsUnavailableError) as info:
        resolve("tiny-dinat", registry=_registry(url))
    message = str(info.value)
    for part in ("'tiny-dinat'", url, "DINAT_NP_OFFLINE", "dinat-convert checkpoint.pth DIR --model tiny-dinat",
                 "--weights DIR", "connect to the network"):
        assert part in message, part
    assert server.requests == []
    assert _leftovers(tmp_path / "home") == []


def test_no_network_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/checkpoint.pth"
    with pytest.raises(hub.WeightsUnavailableError) as info:
        resolve("tiny-dinat", registry=_registry(url), progress=False)
    assert "no network connection" in str(info.value) and url in str(info.value)
    assert not isinstance(info.value, hub.DownloadError)
    assert not (tmp_path / "home" / "tiny-dinat").exists()


def test_http_error_and_wrong_content(server, tmp_path: Path) -> None:
    with pytest.raises(hub.WeightsUnavailableError, match="HTTP 404"):
        resolve("tiny-dinat", registry=_registry(server.url + "/missing.pth"), progress=False)
    with pytest.raises(ConversionError, match="does not convert.*deleted"):
        resolve("tiny-dinat", registry=_registry(server.url + "/page.pth"), progress=False)
    assert not (tmp_path / "home" / "downloads" / "page.pth").exists()
    assert not (tmp_path / "home" / "tiny-dinat").exists()


def test_pinned_sha256_checked(server, tmp_path: Path) -> None:
    registry = _registry(server.url + "/checkpoint.pth", sha256="0" * 64)
    with pytest.raises(hub.DownloadError, match="sha256"):
        resolve("tiny-dinat", registry=registry, progress=False)
    assert _leftovers(tmp_path / "home") == ["downloads"]


def test_folders_and_unknown_names(tmp_path: Path) -> None:
    assert resolve(DATA / "hf_dinat_small_cfg") == DATA / "hf_dinat_small_cfg"
    with pytest.raises(registry.UnknownModelError, match="not in the registry"):
        resolve("no-such-model")
    with pytest.raises(registry.UnknownModelError, match="dinat-convert"):
        resolve(CHECKPOINT)


# ---------------------------------------------------------------------------------------------
# the packaged registry

PUBLISHED = {
    "dinat-mini-in1k-224", "dinat-tiny-in1k-224", "dinat-small-in1k-224", "dinat-base-in1k-224",
    "dinat-large-in22k-in1k-224", "dinat-large-in22k-in1k-384", "dinat-large-11x11-in22k-in1k-384",
    "dinat-large-in22k-224", "dinat-large-11x11-in22k-224",
    "nat-mini-in1k-224", "nat-tiny-in1k-224", "nat-small-in1k-224", "nat-base-in1k-224",
}


def test_packaged_registry_entries_are_complete() -> None:
    models = registry.load_registry()
    family = {name for name, entry in models.items() if entry.get("model_type") in ("dinat_s", "nat_isotropic")}
    assert PUBLISHED | {"digits-demo"} == set(models) - family  # the family's: tests/test_family_convert.py
    for name in PUBLISHED:
        entry = registry.registry_entry(name)
        assert entry["url"].startswith("https://shi-labs.com/projects/") and entry["url"].endswith(".pth")
        pre = entry["preprocessing"]
        assert set(pre) == {"resolution", "crop_pct", "interpolation", "mean", "std"}
        assert pre["resolution"] == (384 if name.endswith("-384") else 224)
        assert pre["crop_pct"] == (1.0 if name.endswith("-384") else 0.875)
        cfg = registry_config(entry)
        labels = cfg.pop("id2label")
        cfg.pop("label2id")
        assert len(labels) == (21841 if entry["label_set"] == "imagenet22k" else 1000) == entry["num_labels"]
        config = DinatConfig(**cfg)  # a valid architecture
        assert config.model_type == ("nat" if name.startswith("nat-") else "dinat")
        if config.model_type == "nat":
            assert all(d == 1 for stage in config.dilations for d in stage)
        # every stage's window fits the stage at the evaluation resolution, or is padded like NATTEN does
        assert config.kernel_size in (7, 11)
    assert registry.registry_entry("shi-labs/dinat-mini-in1k-224")["name"] == "dinat-mini-in1k-224"
    assert registry.registry_entry("dinat-large-in22k-in1k-384")["architecture"]["dilations"][0] == [1, 13, 1]
    assert registry.registry_entry("dinat-large-in22k-224")["hf_repo"] is None


def test_offline_error_for_a_published_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    with pytest.raises(hub.WeightsUnavailableError) as info:
        resolve("dinat-mini-in1k-224")
    assert "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_mini_in1k_224.pth" in str(info.value)
    assert "dinat-convert dinat_mini_in1k_224.pth DIR --model dinat-mini-in1k-224" in str(info.value)


def test_packaged_digits_demo_entry() -> None:
    entry = registry.registry_entry("digits-demo")
    assert entry["local"] == "digits-demo" and "url" not in entry
    folder = registry.packaged_weights_dir() / "digits-demo"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        assert resolve("digits-demo").resolve() == folder.resolve()
    else:  # the demo model is produced by weights/digits-demo/train.py; until then a clear error
        with pytest.raises(registry.UnknownModelError, match="missing from this installation"):
            resolve("digits-demo")


def test_registry_hub_and_converter_do_not_import_the_models() -> None:
    """Imports run downward: the converter and the hub get the model check as an argument."""
    import subprocess
    import sys

    code = ("import sys, dinat_np.registry; assert 'dinat_np.hub' not in sys.modules; "
            "import dinat_np.hub, dinat_np.convert; "
            "print(sorted(m for m in sys.modules if m.startswith(('dinat_np.modeling', 'dinat_np.kernels.cpu', "
            "'dinat_np.kernels.cuda', 'numba'))))")  # the kernels' shared tables (configuration's activations) are fine
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
