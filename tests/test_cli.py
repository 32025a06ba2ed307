"""dinat-classify in a subprocess: table, JSON schema, exit codes, partial failure, progress on stderr.

The model is the bundled offline demo (``--model digits-demo``) when it is in the checkout, otherwise a
tiny random-weight model folder (``--weights DIR``); both run without a network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    DIGITS_DEMO,
    digits_demo_available,
    http_file_server,
    make_tiny_model,
    tiny_registry_entry,
    write_photos,
)

PROG = [sys.executable, "-m", "dinat_np.cli.classify"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("DINAT_NP_OFFLINE", None)
    full_env.update(env or {})
    return subprocess.run(
        [*PROG, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    if digits_demo_available():
        return ["--model", "digits-demo"]
    return ["--weights", str(make_tiny_model(tmp_path_factory.mktemp("tiny")))]


@pytest.fixture(scope="module")
def label_names(model_args) -> dict[int, str]:
    folder = DIGITS_DEMO if model_args[0] == "--model" else Path(model_args[1])
    config = json.loads((folder / "config.json").read_text())
    return {int(k): v for k, v in config["id2label"].items()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return write_photos(tmp_path_factory.mktemp("photos"), 3)


def test_table_output(model_args, label_names, photos):
    result = run_cli(*model_args, "--top-k", "3", photos[0], photos[1])
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    for block, path in zip(blocks, photos[:2], strict=True):
        lines = block.splitlines()
        assert lines[0] == str(path)
        assert lines[1].split() == ["rank", "probability", "label"]
        rows = lines[2:]
        assert len(rows) == 3
        percentages = []
        for rank, row in enumerate(rows, 1):
            fields = row.split(None, 2)
            assert int(fields[0]) == rank
            assert fields[1].endswith("%")
            percentages.append(float(fields[1][:-1]))
            assert fields[2] in label_names.values()
        assert percentages == sorted(percentages, reverse=True)
        assert 0 < sum(percentages) <= 100.01
    # More than one image: a progress bar on stderr, never on stdout.
    assert "classifying" in result.stderr and "2/2" in result.stderr
    assert "classifying" not in result.stdout


def test_json_schema_and_scores_match_the_python_api(model_args, label_names, photos):
    result = run_cli(*model_args, "--json", "--top-k", "4", "--batch-size", "2", *photos)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # stdout is exactly one JSON document (no progress bar in it)
    assert isinstance(document, list) and len(document) == 3
    for entry, path in zip(document, photos, strict=True):
        assert set(entry) == {"path", "predictions"}
        assert entry["path"] == str(path)
        predictions = entry["predictions"]
        assert [p["rank"] for p in predictions] == [1, 2, 3, 4]
        for p in predictions:
            assert set(p) == {"rank", "index", "label", "score"}
            assert isinstance(p["index"], int) and isinstance(p["score"], float)
            assert 0.0 <= p["score"] <= 1.0
            assert p["label"] == label_names[p["index"]]
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
    assert "3/3" in result.stderr

    from dinat_np.classifier import ImageClassifier

    target = "digits-demo" if model_args[0] == "--model" else model_args[1]
    expected = ImageClassifier.from_pretrained(target).predict([str(p) for p in photos], top_k=4)
    for entry, predictions in zip(document, expected, strict=True):
        assert [p["index"] for p in entry["predictions"]] == [p.index for p in predictions]
        np.testing.assert_allclose(
            [p["score"] for p in entry["predictions"]], [p.score for p in predictions], rtol=1e-5, atol=1e-7
        )


def test_directory_walk_and_partial_failure(model_args, tmp_path):
    folder = tmp_path / "album"
    good = write_photos(folder / "nested", 2)
    truncated = folder / "cut.jpg"
    data = good[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_image = folder / "notes.png"
    not_image.write_text("not a picture")
    (folder / "readme.txt").write_text("ignored: not an image extension")
    (folder / ".hidden.jpg").write_bytes(data)  # hidden files are skipped
    missing = tmp_path / "missing.jpg"

    result = run_cli(*model_args, "--json", folder, missing)
    assert_no_traceback(result)
    assert result.returncode == 1
    document = json.loads(result.stdout)
    classified = [entry for entry in document if "predictions" in entry]
    assert sorted(entry["path"] for entry in classified) == sorted(str(p) for p in good)
    assert all(len(entry["predictions"]) == 5 for entry in classified)
    failed = {entry["path"]: entry["error"] for entry in document if "predictions" not in entry}
    assert sorted(failed) == sorted(str(p) for p in (truncated, not_image, missing))  # listed too
    stderr = result.stderr
    assert f"{truncated}:" in stderr and "truncated" in stderr
    assert f"{not_image}:" in stderr and "not an image file" in stderr
    assert f"{missing}:" in stderr and "no such file" in stderr
    assert "readme.txt" not in stderr and ".hidden" not in stderr + result.stdout
    assert "3 of 5 image(s) could not be classified" in stderr


def test_single_image_has_no_progress_bar(model_args, photos):
    result = run_cli(*model_args, "--top-k", "1", photos[2])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[0] == str(photos[2])
    assert len(result.stdout.strip().splitlines()) == 3


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--bogus", "x.jpg"], "unrecognized arguments: --bogus"),
        (["--top-k", "0", "x.jpg"], "--top-k"),
        (["--device", "tpu", "x.jpg"], "--device"),
        (["--model", "a", "--weights", "b", "x.jpg"], "not allowed with argument"),
        ([], "nothing to classify: give image files"),
    ],
)
def test_usage_errors_exit_2(arguments, message):
    result = run_cli(*arguments)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert_no_traceback(result)


def test_missing_model_and_nothing_to_classify_exit_2(model_args, tmp_path, photos):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    nothing = run_cli(*model_args, empty)
    assert nothing.returncode == 2 and "nothing to classify" in nothing.stderr
    assert_no_traceback(nothing)

    no_folder = run_cli("--weights", tmp_path / "no-such-model", photos[0])
    assert no_folder.returncode == 2 and "no-such-model" in no_folder.stderr
    assert_no_traceback(no_folder)

    no_weights = tmp_path / "half-model"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    broken = run_cli("--weights", no_weights, photos[0])
    assert broken.returncode == 2 and "model.safetensors" in broken.stderr
    assert_no_traceback(broken)

    unknown = run_cli("--model", "no-such-model-name", photos[0],
                      env={"DINAT_NP_HOME": str(tmp_path / "cache"), "DINAT_NP_OFFLINE": "1"})
    assert unknown.returncode == 2 and "no-such-model-name" in unknown.stderr
    assert_no_traceback(unknown)


def test_default_model_offline_names_checkpoint_and_ways_out(tmp_path, photos):
    pytest.importorskip("dinat_np.hub")
    result = run_cli(photos[0], env={"DINAT_NP_HOME": str(tmp_path / "cache"), "DINAT_NP_OFFLINE": "1"})
    assert_no_traceback(result)
    assert result.returncode == 3  # the weights are unavailable: not a usage error
    assert "dinat-mini-in1k-224" in result.stderr
    assert "http" in result.stderr  # the URL to fetch by hand
    assert "convert" in result.stderr  # one way out: fetch the file by hand and convert it
    assert result.stdout == ""


def test_threads_option_sets_numba_and_blas(model_args, photos):
    """--threads reaches numba, the usual env variables, and (through them) the BLAS library that NumPy
    loads afterwards: nothing before argument parsing loads NumPy."""
    script = f"""
import ctypes, json, os, sys
from dinat_np.cli.classify import main
numpy_before = "numpy" in sys.modules
rc = main({[*model_args, "--threads", "1", "--json", str(photos[0])]!r})
import numba
blas = None
for line in open("/proc/self/maps"):
    path = line.split()[-1]
    if "openblas" in os.path.basename(path).lower():
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads"):
            if hasattr(lib, name):
                getter = getattr(lib, name)
                getter.restype = ctypes.c_int
                blas = getter()
                break
        break
env = {{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
report = {{"rc": rc, "numba": numba.get_num_threads(), "blas": blas, "env": env, "numpy_before": numpy_before}}
sys.stderr.write(json.dumps(report) + "\\n")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert_no_traceback(result)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["rc"] == 0
    assert report["numpy_before"] is False
    assert report["numba"] == 1
    assert report["env"] == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if report["blas"] is not None:  # NumPy's own OpenBLAS (wheels); other BLAS builds are not probed
        assert report["blas"] == 1
    assert json.loads(result.stdout)[0]["path"] == str(photos[0])


def test_device_cuda_without_gpu_is_a_clear_error(model_args, photos):
    result = run_cli(*model_args, "--device", "cuda", photos[0])
    assert_no_traceback(result)
    if result.returncode != 0:  # on a machine with a GPU and numba-cuda the command simply works
        assert result.returncode == 2
        assert "cuda" in result.stderr.lower()


def test_main_in_process_returns_exit_codes(capsys):
    from dinat_np.cli.classify import main

    assert main(["--bogus"]) == 2
    assert main(["--help"]) == 0
    assert "IMAGE_OR_DIR" in capsys.readouterr().out


def test_cli_import_is_light():
    """Parsing arguments must not wait on numba (or torch), nor load NumPy: thread settings come first."""
    code = (
        "import sys, dinat_np.cli.classify as c; c.build_parser().parse_args(['x.jpg', '--threads', '1']); "
        "print(sorted(m for m in ('numba', 'numpy', 'PIL', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_batch_size_default_is_the_classifier_default():
    from dinat_np.classifier import DEFAULT_BATCH_SIZE
    from dinat_np.cli.classify import build_parser

    parser = build_parser()
    assert parser.parse_args(["x.jpg"]).batch_size == DEFAULT_BATCH_SIZE == 8
    assert f"(default: {DEFAULT_BATCH_SIZE})" in parser.format_help()


def test_no_progress_also_silences_the_model_download(tmp_path, photos):
    """A registry model fetched on first use: the download bar and conversion note are on stderr,
    and --no-progress leaves stderr empty. Served from 127.0.0.1 by the test."""
    source = make_tiny_model(tmp_path / "source", preprocessor={})
    with http_file_server({"tiny.safetensors": (source / "model.safetensors").read_bytes()}) as server:
        url = server.url
        registry = tmp_path / "registry.json"
        entry = tiny_registry_entry(url + "/tiny.safetensors")
        registry.write_text(json.dumps({"models": {"tiny-net": entry}}))
        runs = {}
        for flag in ("--no-progress", None):
            env = {"DINAT_NP_REGISTRY": str(registry), "DINAT_NP_HOME": str(tmp_path / f"cache{len(runs)}")}
            arguments = ["--model", "tiny-net", "--json", photos[0]] + ([flag] if flag else [])
            runs[flag] = run_cli(*arguments, env=env)
    for result in runs.values():
        assert_no_traceback(result)
        assert result.returncode == 0, result.stderr
    assert runs["--no-progress"].stderr == ""
    assert "Downloading tiny-net" in runs[None].stderr and "Converting" in runs[None].stderr
    quiet, loud = (json.loads(runs[flag].stdout) for flag in ("--no-progress", None))
    assert quiet == loud and len(quiet[0]["predictions"]) == 5


def test_no_progress_reaches_from_pretrained(monkeypatch, tmp_path, photos, capsys):
    """In process: the flag is passed on as ImageClassifier.from_pretrained(..., progress=False)."""
    from dinat_np import hub
    from dinat_np.cli.classify import main

    folder = make_tiny_model(tmp_path / "tiny")
    seen = []
    real = hub.resolve_model
    monkeypatch.setattr(hub, "resolve_model", lambda name, **kw: seen.append(kw.get("progress")) or real(name, **kw))
    assert main(["--weights", str(folder), "--json", "--no-progress", str(photos[0]), str(photos[1])]) == 0
    quiet = capsys.readouterr()
    assert main(["--weights", str(folder), "--json", str(photos[0]), str(photos[1])]) == 0
    loud = capsys.readouterr()
    assert seen == [False, True]
    assert quiet.err == "" and "classifying" in loud.err and "2/2" in loud.err
    assert json.loads(quiet.out) == json.loads(loud.out)


@pytest.mark.skipif(not digits_demo_available(), reason="weights/digits-demo not built yet")
def test_digits_demo_classifies_its_samples():
    samples = sorted((DIGITS_DEMO / "samples").glob("*.png"))
    assert samples
    result = run_cli("--model", "digits-demo", "--json", "--top-k", "1", *samples)
    assert result.returncode == 0, result.stderr
    for entry in json.loads(result.stdout):
        digit = int(Path(entry["path"]).stem.split("_")[-1])
        assert entry["predictions"][0]["index"] == digit
        with Image.open(entry["path"]) as image:
            assert image.size[0] > 0
