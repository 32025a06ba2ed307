"""dinat-classify in pipelines: --jsonl, --files-from, - for standard input, --version, --list-models,
the exit code for unavailable weights, and --dask on a LocalCluster of two worker processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from dinat_np import __version__
from dinat_np.registry import load_registry, packaged_weights_dir

SAMPLES = sorted((packaged_weights_dir() / "digits-demo" / "samples").glob("*.png"))
DATA = Path(__file__).parent / "data"


def run(*args: object, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """dinat-classify as a user runs it, stdout and stderr kept apart (bytes)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DINAT_NP_")}
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-m", "dinat_np.cli.classify", *map(str, args)], input=stdin,
                            capture_output=True, env=full_env, timeout=300)
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    return result


def _lines(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def test_jsonl_one_object_per_image_in_input_order_failures_included(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    inputs = [SAMPLES[0], broken, SAMPLES[1], tmp_path / "missing.png"]
    result = run("--model", "digits-demo", "--jsonl", "--top-k", "2", *inputs)
    assert result.returncode == 1
    records = _lines(result)
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    assert [sorted(r) for r in records] == [["path", "predictions"], ["error", "path"]] * 2
    assert "not an image file" in records[1]["error"] and "no such file" in records[3]["error"]
    assert [p["rank"] for p in records[0]["predictions"]] == [1, 2]
    digit = SAMPLES[0].stem.split("_")[1]
    assert records[0]["predictions"][0]["label"] == digit
    # --json carries the same records as one document
    document = json.loads(run("--model", "digits-demo", "--json", "--top-k", "2", *inputs).stdout)
    assert document == records


def test_files_from_a_file_or_standard_input_and_one_image_on_standard_input(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{SAMPLES[1]}\n\n{SAMPLES[2]}\n")
    alone = ["--model", "digits-demo", "--jsonl", "--batch-size", "1"]  # batched alike, the scores are equal
    from_file = _lines(run(*alone, SAMPLES[0], "--files-from", listing))
    assert [r["path"] for r in from_file] == [str(p) for p in SAMPLES[:3]]
    from_stdin = _lines(run(*alone, "--files-from", "-", stdin=listing.read_bytes()))
    assert from_stdin == from_file[1:]
    one = _lines(run(*alone, "-", stdin=SAMPLES[0].read_bytes()))
    assert one == [{**from_file[0], "path": "-"}]
    both = run("--model", "digits-demo", "-", "--files-from", "-", stdin=b"")
    assert both.returncode == 2 and b"standard input cannot hold both" in both.stderr
    empty = run("--model", "digits-demo", "--files-from", "-", stdin=b"\n")
    assert empty.returncode == 2 and b"nothing to classify" in empty.stderr
    absent = run("--model", "digits-demo", "--files-from", tmp_path / "absent.txt")
    assert absent.returncode == 2 and b"absent.txt" in absent.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.decode().strip() == f"dinat-classify {__version__}"


def test_list_models_shows_registry_names_hub_ids_and_what_is_cached(tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(DATA / "hf_dinat_small_cfg", home / "dinat-large-in22k-224")  # as a conversion leaves it
    shutil.copytree(DATA / "hf_dinat_small_cfg", home / "hub" / "models--someone--dinat-elsewhere" / ("0" * 40))
    env = {"DINAT_NP_HOME": str(home)}
    table = run("--list-models", env=env).stdout.decode().splitlines()
    assert table[0].split() == ["NAME", "HUGGING", "FACE", "ID", "CACHED"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    registry = load_registry()
    assert set(registry) | {"someone/dinat-elsewhere"} == set(rows)
    assert rows["dinat-mini-in1k-224"] == ["shi-labs/dinat-mini-in1k-224", "no"]
    assert rows["dinat-large-in22k-224"] == ["-", "yes"]
    assert rows["digits-demo"] == ["-", "yes"]  # shipped with the package
    assert rows["someone/dinat-elsewhere"] == ["someone/dinat-elsewhere", "yes"]
    document = json.loads(run("--list-models", "--json", env=env).stdout)
    entry = next(row for row in document if row["name"] == "dinat-large-in22k-224")
    assert entry["cached"] == [str(home / "dinat-large-in22k-224")] and entry["hf_repo"] is None


def test_unavailable_weights_exit_3_unknown_models_exit_2(tmp_path: Path) -> None:
    env = {"DINAT_NP_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    offline = run("--model", "dinat-mini-in1k-224", SAMPLES[0], env=env)
    assert offline.returncode == 3 and b"cannot be downloaded" in offline.stderr and offline.stdout == b""
    unknown = run("--model", "no-such-model", SAMPLES[0], env=env)
    assert unknown.returncode == 2 and b"no-such-model" in unknown.stderr


def test_dask_on_a_local_cluster_gives_what_one_process_gives(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    images = []
    for copy in range(3):  # 18 files: several tasks of 4 batches of 2
        for sample in SAMPLES:
            images.append(tmp_path / f"{copy}-{sample.name}")
            shutil.copy(sample, images[-1])
    images.insert(5, tmp_path / "missing.png")
    # Batched alike and with the same threads (Dask's workers start with one BLAS thread), the scores are equal.
    arguments = ["--model", "digits-demo", "--jsonl", "--batch-size", "2", "--threads", "1", "--no-progress", *images]
    alone = run(*arguments)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        spread = run("--dask", cluster.scheduler_address, *arguments)
        with distributed.Client(cluster) as client:
            worked = client.run(lambda: "dinat_np.cli.on_dask" in sys.modules)
    assert spread.returncode == alone.returncode == 1
    assert _lines(spread) == _lines(alone) and len(_lines(alone)) == 19
    assert list(worked.values()) == [True, True]  # both worker processes classified


class _FailsOnWorkers:
    """A stand-in classifier whose task fails where it meets the file named 'crash'."""

    def iter_predict(self, sources: list, top_k: int, batch_size: int) -> Iterator:
        if "crash" in sources:
            raise MemoryError("out of memory on the worker")
        return iter([SimpleNamespace(to_dict=lambda path: {"path": path, "predictions": []})] * len(sources))


def test_a_task_failing_on_the_dask_cluster_gives_error_records_not_a_traceback() -> None:
    distributed = pytest.importorskip("distributed")
    from dinat_np.cli.on_dask import BATCHES_PER_TASK, classify_on_dask

    names = [f"image-{k}" for k in range(3 * BATCHES_PER_TASK)]
    names[BATCHES_PER_TASK + 1] = "crash"  # in the second of three tasks (batches of 1)
    progress = []
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        records = list(classify_on_dask(cluster.scheduler_address, _FailsOnWorkers(), [(n, n) for n in names],
                                        top_k=1, batch_size=1, threads=None, on_progress=progress.append))
    assert [r["path"] for r in records] == names and progress == [BATCHES_PER_TASK] * 3
    failed = [r for r in records if "error" in r]
    assert [r["path"] for r in failed] == names[BATCHES_PER_TASK:2 * BATCHES_PER_TASK]
    assert all("MemoryError: out of memory on the worker" in r["error"] for r in failed)


def test_dask_without_a_scheduler_is_a_usage_error() -> None:
    pytest.importorskip("distributed")
    result = run("--dask", "tcp://127.0.0.1:1", "--model", "digits-demo", SAMPLES[0])
    assert result.returncode == 2 and b"cannot reach the scheduler" in result.stderr
