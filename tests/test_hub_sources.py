"""Hub names through huggingface_hub, the original-checkpoint fallback, and locks, against a fake Hub on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so each
resolution runs in a child process with the environment a user would set: that is also the test of
honouring them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import filelock
import numpy as np
import pytest

from dinat_np import DinatForImageClassification
from dinat_np.state_dict import read_safetensors, write_safetensors

from tests.helpers import FakeHub, fake_hub

DATA = Path(__file__).parent / "data"
HF_MODEL = DATA / "hf_dinat_small_cfg"
ORIGINAL = DATA / "original_dinat_small_cfg"  # the same architecture, other weights
REPO = "test-org/tiny-dinat"  # the Hub copy of the registry entry "tiny-dinat"
UNREGISTERED = "test-org/dinat-elsewhere"  # a DiNAT repository known by its id alone
PREPROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 64, "width": 64},
                "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

RESOLVE = """
import json, sys
from dinat_np import hub
from dinat_np.modeling_auto import check_weights
try:
    folder = hub.resolve_model(sys.argv[1], check_weights=check_weights, **json.loads(sys.argv[2]))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
else:
    print(json.dumps({"folder": str(folder)}))
"""


def _hf_files(weights: str = "model.safetensors") -> dict[str, bytes]:
    return {"config.json": (HF_MODEL / "config.json").read_bytes(), weights: (HF_MODEL / weights).read_bytes(),
            "preprocessor_config.json": json.dumps(PREPROCESSOR).encode()}


class Child:
    """Resolves names in child processes that see the fake Hub through the environment."""

    def __init__(self, hub: FakeHub, root: Path) -> None:
        self.hub, self.root = hub, root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DINAT_NP_", "TRANSFORMERS_"))}
        self.env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(root / "hf"), DINAT_NP_HOME=str(root / "home"),
                        HF_HUB_DISABLE_TELEMETRY="1", DINAT_NP_REGISTRY=str(root / "registry.json"))
        entry = {"model_type": "dinat", "architecture": {"embed_dim": 16, "depths": [2, 2, 2, 1],
                                                         "num_heads": [1, 2, 2, 4], "kernel_size": 5,
                                                         "dilations": [[1, 3], [1, 2], [1, 1], [1]], "mlp_ratio": 2.0},
                 "hf_repo": REPO, "url": f"{hub.url}/files/checkpoint.pth", "label_set": None}
        original = {**entry, "hf_repo": None}
        registry = {"models": {"tiny-dinat": entry, "tiny-dinat-original": original}}
        (root / "registry.json").write_text(json.dumps(registry))

    def start(self, name: str, extra_env: dict | None = None, **options) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", RESOLVE, name, json.dumps(options)],
                                env={**self.env, **(extra_env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def resolve(self, name: str, extra_env: dict | None = None, **options) -> tuple[dict, str]:
        """The child's answer ({"folder"} or {"error", "message"}) and its stderr."""
        out, err = self.start(name, extra_env, **options).communicate(timeout=120)
        assert "Traceback" not in err, err
        return json.loads(out), err


def _closed_port_url() -> str:
    """The address of a port nobody listens on: an unreachable Hub."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture()
def child(tmp_path: Path):
    with fake_hub() as hub:
        yield Child(hub, tmp_path)


def _same_tensors(folder: Path, reference: Path) -> bool:
    ours, theirs = read_safetensors(folder / "model.safetensors"), read_safetensors(reference)
    return sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_first_online_then_offline_from_the_cache(child: Child) -> None:
    commit = child.hub.publish(REPO, _hf_files())
    answer, err = child.resolve(REPO)
    folder = Path(answer["folder"])
    assert folder == child.root / "home" / "hub" / "models--test-org--tiny-dinat" / commit  # keyed by the commit
    assert "Converting" in err
    assert _same_tensors(folder, HF_MODEL / "model.safetensors")
    assert json.loads((folder / "preprocessor_config.json").read_text()) == PREPROCESSOR
    snapshot = child.root / "hf" / "models--test-org--tiny-dinat" / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    expected = np.load(HF_MODEL / "expected.npz")
    logits = DinatForImageClassification.from_pretrained(folder)(expected["pixel_values"]).logits
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)

    served = len(child.hub.requests)
    for offline in ({"HF_HUB_OFFLINE": "1"}, {"DINAT_NP_OFFLINE": "1"}):
        again, err = child.resolve(REPO, offline)
        assert again == answer and "Converting" not in err
    assert child.resolve(REPO, local_files_only=True)[0] == answer
    assert len(child.hub.requests) == served  # offline means no request at all
    # online again: one look at the Hub (has main moved?), nothing downloaded
    assert child.resolve(REPO)[0] == answer
    assert [m for m, _ in child.hub.requests[served:]] == ["HEAD"]


def test_a_registry_name_and_its_repo_id_share_the_converted_folder(child: Child) -> None:
    child.hub.publish(REPO, _hf_files())
    by_name, _ = child.resolve("tiny-dinat")
    assert child.resolve(REPO)[0] == by_name
    provenance = json.loads((Path(by_name["folder"]) / "conversion.json").read_text())
    assert provenance["hf_repo"] == REPO and provenance["registry_name"] == "tiny-dinat"


def test_a_cache_filled_by_huggingface_hub_serves_offline(child: Child) -> None:
    """The way out the error message gives: fill the HF cache elsewhere (``hf download``), run offline here."""
    commit = child.hub.publish(REPO, _hf_files())
    fill = "import huggingface_hub, sys; print(huggingface_hub.snapshot_download(sys.argv[1]))"
    filled = subprocess.run([sys.executable, "-c", fill, REPO], env=child.env, capture_output=True, text=True)
    assert filled.returncode == 0, filled.stderr
    assert Path(filled.stdout.strip()).name == commit
    served = len(child.hub.requests)
    answer, _ = child.resolve(REPO, {"HF_HUB_OFFLINE": "1"})
    assert Path(answer["folder"]).name == commit and len(child.hub.requests) == served
    assert _same_tensors(Path(answer["folder"]), HF_MODEL / "model.safetensors")


def test_pytorch_model_bin_goes_through_the_safe_reader(child: Child) -> None:
    child.hub.publish(REPO, _hf_files("pytorch_model.bin"))
    answer, _ = child.resolve(REPO)
    assert _same_tensors(Path(answer["folder"]), HF_MODEL / "model.safetensors")
    assert child.hub.transfers("model.safetensors") == 0 and child.hub.transfers("pytorch_model.bin") == 1
    # offline, the cache remembers that the repository has no model.safetensors
    assert child.resolve(REPO, {"HF_HUB_OFFLINE": "1"})[0] == answer


def test_a_revision_pins_the_weights(child: Child, tmp_path: Path) -> None:
    first = child.hub.publish(REPO, _hf_files())
    tensors = {k: np.array(v) for k, v in read_safetensors(HF_MODEL / "model.safetensors").items()}
    tensors["classifier.bias"] = tensors["classifier.bias"] + np.float32(1.0)
    write_safetensors(tmp_path / "second.safetensors", tensors)
    second = child.hub.publish(
        REPO, {**_hf_files(), "model.safetensors": (tmp_path / "second.safetensors").read_bytes()})
    child.hub.branches[REPO]["v1"] = first  # a tag

    latest = Path(child.resolve(REPO)[0]["folder"])
    pinned = Path(child.resolve(REPO, revision=first)[0]["folder"])
    tagged = Path(child.resolve(REPO, revision="v1")[0]["folder"])
    assert (latest.name, pinned.name, tagged.name) == (second, first, first)
    assert _same_tensors(pinned, HF_MODEL / "model.safetensors")
    assert _same_tensors(latest, tmp_path / "second.safetensors")
    # a commit already converted needs no request at all
    served = len(child.hub.requests)
    assert Path(child.resolve(REPO, revision=first)[0]["folder"]) == pinned
    assert len(child.hub.requests) == served
    answer, _ = child.resolve(REPO, revision="no-such-branch")
    assert answer["error"] == "UnknownModelError" and "no revision 'no-such-branch'" in answer["message"]


def test_an_interrupted_transfer_resumes_and_leaves_nothing_half_converted(child: Child) -> None:
    child.hub.publish(UNREGISTERED, _hf_files())
    child.hub.cut.add("model.safetensors")
    answer, err = child.resolve(UNREGISTERED)
    if "error" in answer:  # huggingface_hub 0.3x stops; 1.x resumes in the same call
        assert answer["error"] == "DownloadError" and "the transfer failed" in answer["message"]
        assert not (child.root / "home" / "hub" / "models--test-org--dinat-elsewhere").exists()
        answer, err = child.resolve(UNREGISTERED)
    # The second transfer carries on where the first stopped, or starts over when nothing reached the
    # disk (huggingface_hub 0.3x writes in 10 MB chunks; this file is smaller).
    size = (HF_MODEL / "model.safetensors").stat().st_size
    assert child.hub.ranges in ([], [f"bytes={size // 2}-"]) and child.hub.transfers("model.safetensors") == 2
    assert _same_tensors(Path(answer["folder"]), HF_MODEL / "model.safetensors")
    partial = [p for p in (child.root / "home").rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
    assert partial == []


def test_the_original_checkpoint_when_the_hub_is_unreachable_and_the_message_says_so(child: Child) -> None:
    child.hub.publish(REPO, _hf_files())
    child.hub.files["checkpoint.pth"] = (ORIGINAL / "checkpoint.pth").read_bytes()
    no_hub = {"HF_ENDPOINT": _closed_port_url()}
    answer, err = child.resolve("tiny-dinat", no_hub)
    folder = Path(answer["folder"])
    assert folder == child.root / "home" / "tiny-dinat"
    assert f"the Hugging Face Hub ({REPO}) cannot deliver 'tiny-dinat' (the Hub cannot be reached" in err
    assert f"using the original checkpoint ({child.hub.url}/files/checkpoint.pth) instead" in err
    expected = np.load(ORIGINAL / "expected.npz")
    logits = DinatForImageClassification.from_pretrained(folder)(expected["pixel_values"]).logits
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)
    # offline, the converted original serves the name; a pinned revision is the Hub's and never does
    assert child.resolve("tiny-dinat", {"HF_HUB_OFFLINE": "1"})[0] == answer
    answer, _ = child.resolve("tiny-dinat", {"HF_HUB_OFFLINE": "1"}, revision="main")
    assert answer["error"] == "WeightsUnavailableError" and len(answer["message"].split("\n  from ")) == 2


def test_offline_and_not_cached_names_both_sources_and_the_ways_out(child: Child) -> None:
    answer, _ = child.resolve("tiny-dinat", {"HF_HUB_OFFLINE": "1"})
    assert answer["error"] == "WeightsUnavailableError"
    message = answer["message"]
    for part in (f"from the Hugging Face Hub ({REPO}): downloads are disabled (HF_HUB_OFFLINE=1)",
                 f"from {child.hub.url}/files/checkpoint.pth: downloads are disabled (HF_HUB_OFFLINE=1)",
                 f"hf download {REPO}", "dinat-convert checkpoint.pth DIR --model tiny-dinat",
                 "unset HF_HUB_OFFLINE"):
        assert part in message, part
    assert child.hub.requests == []


def test_repositories_that_are_not_dinat_models(child: Child) -> None:
    child.hub.publish("test-org/a-vit", {"config.json": json.dumps({"model_type": "vit"}).encode()})
    answer, _ = child.resolve("test-org/a-vit")
    assert answer["error"] == "UnknownModelError" and "not a DiNAT or NAT model" in answer["message"]
    answer, _ = child.resolve("test-org/nothing-here")
    assert answer["error"] == "UnknownModelError" and "no such repository" in answer["message"]
    assert not (child.root / "home" / "hub").exists() or not any((child.root / "home" / "hub").iterdir())


def _race(child: Child, name: str, lock_name: str) -> list[tuple[str, str]]:
    """Three cold processes resolving ``name`` while the test holds the cache lock they need, released
    once all three wait for it: the race is certain, not a matter of timing. Returns (stdout, stderr)s."""
    locks = child.root / "home" / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    processes, stderr = [], []
    with filelock.FileLock(str(locks / lock_name)):
        for _ in range(3):
            processes.append(child.start(name))
            stderr.append([])
            threading.Thread(target=stderr[-1].extend, args=(processes[-1].stderr,), daemon=True).start()
        deadline = time.monotonic() + 120  # a bound against hanging, not a measurement
        while not all(any("Waiting for another process" in line for line in lines) for lines in stderr):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), stderr
            time.sleep(0.1)
    results = []
    for process, lines in zip(processes, stderr, strict=True):
        out = process.stdout.read()
        process.wait(timeout=120)
        results.append((out, "".join(lines)))
    return results


def test_racing_cold_processes_download_and_convert_once(child: Child) -> None:
    commit = child.hub.publish(REPO, _hf_files())
    child.hub.files["checkpoint.pth"] = (ORIGINAL / "checkpoint.pth").read_bytes()
    for name, lock_name, transferred in (
        (REPO, f"models--test-org--tiny-dinat--{commit}.lock", ("config.json", "model.safetensors")),
        ("tiny-dinat-original", "tiny-dinat-original.lock", ("checkpoint.pth",)),
    ):
        results = _race(child, name, lock_name)
        folders = {json.loads(out).get("folder") for out, _ in results}
        assert len(folders) == 1 and None not in folders, results
        assert sum(err.count("Converting") for _, err in results) == 1
        for filename in transferred:
            assert child.hub.transfers(filename) == 1, filename
