"""Hostile and careless inputs, run as a user runs them: the installed dinat-classify / dinat-convert in a
subprocess. Each case asserts the exit status, a message naming the problem, no traceback, no staging
debris, and bounded memory (the child's peak RSS, from wait4) and time (a timeout).

The end of the file is a fuzz pass (fixed seeds, a few hundred mutations each) over the safetensors
reader, the .pth reader and config.json, run in a child process so that its memory is measured alone:
every mutation must end in a clean error (ValueError or OSError with a message) or a correct result.
Running this file as a script (``python tests/test_hostile.py fuzz KIND``) is that child.

docs/limits.md lists what is refused and why.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
DIGITS = REPO / "weights" / "digits-demo"
BIN = Path(sys.executable).parent
CLASSIFY, CONVERT = BIN / "dinat-classify", BIN / "dinat-convert"

# Peak RSS allowed to a child: a few times what a normal run takes (digits-demo: ~175 MB to classify,
# ~100 MB to convert), far below what the inputs below made the old code allocate (1-24 GB).
CLASSIFY_RSS_MB = 600
CONVERT_RSS_MB = 400
TIMEOUT_S = 240  # a cold Numba cache compiles the kernels first (~30 s on a quiet machine)
# A hard cap on each child's address space, so that a regression fails here instead of swapping the machine.
_ADDRESS_SPACE = 6 * 2**30

pytestmark = pytest.mark.skipif(not (CLASSIFY.exists() and CONVERT.exists()),
                                reason="the dinat-classify / dinat-convert commands are not installed")


# --------------------------------------------------------------------------------------------------
# Running a command with its memory measured
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int
    stdout: bytes
    stderr: str
    max_rss_mb: float
    timed_out: bool

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def _environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINAT_NP_")}
    env.update(DINAT_NP_HOME=str(home), DINAT_NP_OFFLINE="1", **extra)
    return env


# The command runs under this small Python process, which caps its address space and reports its peak RSS.
# Forked straight from the test process, the command's peak would include the test process's own memory
# (Linux keeps the high-water mark of the memory a process had before exec).
_MEASURE = """
import resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
status = subprocess.call(sys.argv[3:])
with open(sys.argv[1], "w") as report:
    report.write(f"{status} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def run(command: Path, *args: Any, env: dict[str, str], timeout: float = TIMEOUT_S) -> Outcome:
    """Run a command to completion, with its own peak RSS."""
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        report = Path(scratch) / "report"
        argv = [str(command), *[a if isinstance(a, bytes) else str(a) for a in args]]
        process = subprocess.Popen([sys.executable, "-c", _MEASURE, str(report), str(_ADDRESS_SPACE), *argv],
                                   stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            timed_out = True
        status, max_rss_kb = map(int, report.read_text().split()) if report.exists() else (-9, 0)
        out.seek(0)
        err.seek(0)
        return Outcome(status, out.read(), err.read().decode("utf-8", "replace"), max_rss_kb / 1024, timed_out)


def debris(folder: Path) -> list[str]:
    """Staging files and folders anywhere under ``folder`` (what an interrupted write leaves)."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".partial", ".part", ".tmp")))


def check(outcome: Outcome, status: int, *patterns: str, rss_mb: float, folder: Path | None = None) -> None:
    """The exit status, each pattern (a regex) in stderr, no traceback, bounded memory, no debris."""
    assert not outcome.timed_out, f"killed after {TIMEOUT_S} s; stderr: {outcome.stderr[-2000:]}"
    assert outcome.returncode == status, (outcome.returncode, outcome.stderr[-2000:])
    assert "Traceback" not in outcome.stderr, outcome.stderr
    for pattern in patterns:
        assert re.search(pattern, outcome.stderr), (pattern, outcome.stderr[-2000:])
    assert outcome.max_rss_mb < rss_mb, f"peak RSS {outcome.max_rss_mb:.0f} MB"
    if folder is not None:
        assert debris(folder) == []


def classify(*args: Any, home: Path, **extra: str) -> Outcome:
    return run(CLASSIFY, "--no-progress", *args, env=_environment(home, **extra))


def convert(*args: Any, home: Path) -> Outcome:
    return run(CONVERT, *args, env=_environment(home))


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture()
def sample() -> Path:
    return DIGITS / "samples" / "digit_3.png"


def digits_copy(folder: Path, *, config: dict | None = None, tensors: dict | None = None,
                preprocessing: dict | None = None) -> Path:
    """A copy of the bundled digits-demo model folder, with config.json fields / tensors replaced.

    ``preprocessing``: drop preprocessor_config.json and record this timm transform in conversion.json
    (as dinat-convert does for a registry model).
    """
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(DIGITS / name, folder / name)
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        data.update(config)
        (folder / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        from safetensors.numpy import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        weights.update(tensors)
        save_file(weights, folder / "model.safetensors")
    if preprocessing is not None:
        (folder / "preprocessor_config.json").unlink()
        (folder / "conversion.json").write_text(json.dumps({"preprocessing": preprocessing}))
    return folder


def digits_tensor(name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(DIGITS / "model.safetensors")[name]


def _text(s: str) -> bytes:
    data = s.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _ints(values: Sequence[int]) -> bytes:
    return b"(" + b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in values) + b"t"


def tensor_pickle(storage_numel: int, size: Sequence[int], stride: Sequence[int]) -> bytes:
    """data.pkl of ``{"w": tensor}``: float32 ``size``/``stride`` over storage '0' (written by hand, as torch
    would: _rebuild_tensor_v2(persistent storage, offset 0, size, stride, False, OrderedDict()))."""
    return (b"\x80\x02}" + _text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu")
            + b"J" + storage_numel.to_bytes(4, "little") + b"tQ"
            + b"J\x00\x00\x00\x00" + _ints(size) + _ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtRs.")


def torch_zip(path: Path, pkl: bytes, storage: bytes | int, compression: int = zipfile.ZIP_STORED) -> Path:
    """A torch.save-style archive; ``storage``: the bytes of storage '0', or a count of zero bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = compression
        with archive.open(info, "w", force_zip64=True) as stream:
            if isinstance(storage, int):
                chunk = bytes(8 << 20)
                for start in range(0, storage, len(chunk)):
                    stream.write(chunk[: storage - start])
            else:
                stream.write(storage)
        archive.writestr("archive/version", "3\n")
    return path


# --------------------------------------------------------------------------------------------------
# dinat-classify
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, pattern", [
    ("--threads", "100000", r"--threads: at most \d+ \(the number of CPUs\)"),
    ("--threads", "100000000000", r"--threads: at most"),
    ("--threads", "0", r"--threads: expected a positive integer"),
    ("--batch-size", "100000", r"--batch-size: at most 256"),
])
def test_thread_and_batch_counts_are_bounded(home, sample, option, value, pattern):
    check(classify("--model", "digits-demo", option, value, sample, home=home), 2, pattern,
          rss_mb=CLASSIFY_RSS_MB)


def test_extreme_aspect_ratios_cost_no_more_than_a_square(tmp_path, home):
    """The timm transform (shorter side to 256, crop 224) on 1-pixel strips: resized whole, 60000 x 1
    made 15 million x 256 pixels (12 GB)."""
    folder = digits_copy(tmp_path / "timm", preprocessing={"resolution": 224, "crop_pct": 0.875,
                                                           "interpolation": "bicubic"})
    rng = np.random.default_rng(0)
    images = []
    for width, height in ((5000, 1), (60000, 1), (1, 20000)):
        images.append(tmp_path / f"strip_{width}x{height}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images[-1])
    outcome = classify("--weights", folder, "--json", *images, home=home)
    check(outcome, 0, rss_mb=CLASSIFY_RSS_MB)
    documents = json.loads(outcome.stdout)
    assert [d["path"] for d in documents] == [str(p) for p in images]
    assert all(len(d["predictions"]) == 5 for d in documents)


@pytest.mark.parametrize("settings, pattern", [
    ({"size": {"height": 100000, "width": 100000}}, r"size must be at most 4096 pixels"),
    ({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 1e-9},
     r"crop_pct 1e-09 resizes to \d+ pixels"),
    ({"image_mean": [0.5, 0.5, 1e999]}, r"preprocessor_config.json is not valid JSON: 1e999 is too large"),
    ({"do_resize": False}, r"would be \d+ x \d+ pixels, more than 4096 on a side"),
])
def test_preprocessor_settings_are_bounded(tmp_path, home, settings, pattern):
    folder = digits_copy(tmp_path / "model")
    data = json.loads((folder / "preprocessor_config.json").read_text())
    data.update(settings)
    (folder / "preprocessor_config.json").write_text(json.dumps(data).replace("Infinity", "1e999"))
    # A wide image, which a processor that does not resize would keep whole.
    image = tmp_path / "wide.png"
    Image.new("RGB", (5000, 3)).save(image)
    outcome = classify("--weights", folder, image, home=home)
    status = 1 if "do_resize" in settings else 2  # that one is refused per image, the others per model
    check(outcome, status, pattern, rss_mb=CLASSIFY_RSS_MB)


@pytest.mark.parametrize("change, pattern", [
    ({"embed_dim": 1e8}, r"DinatConfig\.embed_dim: must be an integer from 2 to 65536, got 100000000\.0"),
    ({"num_channels": 1e9}, r"DinatConfig\.num_channels: must be an integer from 1 to 1024"),
    ({"mlp_ratio": 1e308}, r"DinatConfig\.mlp_ratio: must be above 0 and at most 64"),
    ({"num_labels": 10**9, "id2label": None}, r"DinatConfig\.num_labels: must be an integer from 0 to 100000"),
    ({"depths": [2, 2, 2, 10**12]}, r"DinatConfig\.depths: stage 3: must be an integer from 1 to 1024"),
    ({"embed_dim": 8192}, r"describes a model of [\d,]+ parameters, above the limit of 2,000,000,000"),
    ({"embed_dim": 1024, "num_heads": [1, 2, 4, 8]}, r"holds [\d,]+ values, but the configuration describes a "
                                                      r"model of [\d,]+ parameters"),
])
def test_bad_config_values_name_the_field(tmp_path, home, sample, change, pattern):
    folder = digits_copy(tmp_path / "model", config=change)
    check(classify("--weights", folder, sample, home=home), 2, pattern, rss_mb=CLASSIFY_RSS_MB)


@pytest.mark.parametrize("text, pattern", [
    ('"layer_norm_eps": NaN', r"not valid JSON: NaN is not a JSON number"),
    ('"layer_norm_eps": -Infinity', r"not valid JSON: -Infinity is not a JSON number"),
    ('"layer_norm_eps": 1e999', r"not valid JSON: 1e999 is too large"),
])
def test_non_finite_config_values_are_refused(tmp_path, home, sample, text, pattern):
    folder = digits_copy(tmp_path / "model")
    path = folder / "config.json"
    path.write_text(re.sub(r'"layer_norm_eps": [^,\n]+', text, path.read_text()))
    check(classify("--weights", folder, sample, home=home), 2, pattern, rss_mb=CLASSIFY_RSS_MB)


def test_non_finite_weights_are_refused_at_load(tmp_path, home, sample):
    weight = digits_tensor("classifier.weight").copy()
    weight[3, 5] = np.nan
    bias = digits_tensor("dinat.encoder.levels.1.layers.0.output.dense.bias").copy()
    bias[0] = np.inf
    folder = digits_copy(tmp_path / "model", tensors={"classifier.weight": weight,
                                                      "dinat.encoder.levels.1.layers.0.output.dense.bias": bias})
    outcome = classify("--weights", folder, "--json", sample, home=home)
    check(outcome, 2, r"tensors with NaN/inf values: classifier\.weight, dinat\.encoder\.levels\.1\.layers\.0",
          rss_mb=CLASSIFY_RSS_MB)
    assert outcome.stdout == b""


def test_overflowing_scores_are_never_printed(tmp_path, home, sample):
    """Finite weights whose logits overflow float32: no "nan%" in the table, valid JSON."""
    huge = np.sign(digits_tensor("classifier.weight")) * np.float32(3e38)
    folder = digits_copy(tmp_path / "model", tensors={"classifier.weight": huge.astype(np.float32)})
    for extra in ([], ["--json"]):
        outcome = classify("--weights", folder, *extra, sample, DIGITS / "samples" / "digit_7.png", home=home)
        check(outcome, 1, r"cannot classify .*digit_3\.png: the model gave NaN or infinite scores",
              r"2 of 2 image\(s\) could not be classified", rss_mb=CLASSIFY_RSS_MB)
        if extra:  # valid JSON, the failures listed as errors, no score at all
            records = json.loads(outcome.stdout.decode("utf-8"))
            assert [sorted(record) for record in records] == [["error", "path"]] * 2
        else:
            assert "nan" not in outcome.out.lower() and "inf" not in outcome.out.lower()


def test_json_is_valid_for_file_names_that_are_not_utf8(tmp_path, home, sample):
    folder = tmp_path / "images"
    folder.mkdir()
    name = b"caf\xe9-\xff.png"  # Latin-1, not UTF-8
    shutil.copy(sample, os.path.join(os.fsencode(folder), name))
    outcome = classify("--model", "digits-demo", "--json", folder, home=home)
    check(outcome, 0, rss_mb=CLASSIFY_RSS_MB)
    documents = json.loads(outcome.stdout.decode("utf-8"))  # strict: raises on raw bytes
    assert os.fsencode(documents[0]["path"]) == os.path.join(os.fsencode(folder), name)
    assert documents[0]["predictions"][0]["label"] == "3"


def test_special_files_in_a_folder_are_skipped(tmp_path, home, sample):
    """A FIFO named like an image once blocked the whole run; a socket or device must not be read either."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(sample, folder / "a_good.png")
    os.mkfifo(folder / "pipe.png")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "socket.jpg"))
    try:
        outcome = classify("--model", "digits-demo", folder, home=home)
        check(outcome, 0, r"skipping .*pipe\.png: not a regular file", r"skipping .*socket\.jpg: not a regular file",
              rss_mb=CLASSIFY_RSS_MB)
        assert outcome.out.startswith(str(folder / "a_good.png"))
        # Named on the command line, a FIFO is refused without being opened for a blocking read.
        outcome = classify("--model", "digits-demo", folder / "pipe.png", sample, home=home)
        check(outcome, 1, r"cannot classify .*pipe\.png: is a FIFO \(named pipe\), not an image file",
              rss_mb=CLASSIFY_RSS_MB)
        assert str(sample) in outcome.out
    finally:
        listener.close()


def test_symlink_loop_and_broken_link_are_named(tmp_path, home):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "nowhere.png")
    outcome = classify("--model", "digits-demo", tmp_path / "loop.png", tmp_path / "broken.png", home=home)
    check(outcome, 1, r"loop\.png: a symbolic link loop", r"broken\.png: no such file \(a broken symbolic link\)",
          rss_mb=CLASSIFY_RSS_MB)


def test_empty_model_name_is_a_usage_error(home, sample):
    check(classify("--model", "", sample, home=home), 2, r"--model needs a model name", rss_mb=CLASSIFY_RSS_MB)


def test_decompression_bomb_is_refused_quietly(tmp_path, home):
    """Between Pillow's limit and twice it Pillow only warns, on stderr with its own file name."""
    path = tmp_path / "bomb.png"
    Image.new("1", (9500, 9500)).save(path)  # 90 million pixels in a few kilobytes
    outcome = classify("--model", "digits-demo", path, home=home)
    check(outcome, 1, r"bomb\.png: image is too large to decode safely \(90,250,000 pixels, limit 89,478,485\)",
          rss_mb=CLASSIFY_RSS_MB)
    assert "DecompressionBombWarning" not in outcome.stderr and "Image.py" not in outcome.stderr


def test_terminated_download_leaves_no_partial_file(tmp_path, home):
    """SIGTERM while a checkpoint downloads: the .part file goes, the exit status says so."""
    from tests.helpers import http_file_server

    entry = {"model_type": "dinat", "url": "https://example.invalid/stall/stalling.pth", "label_set": None,
             "architecture": {}}
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": {"stalling": entry}}))
    downloads = home / "downloads"
    with http_file_server({"stalling.pth": bytes(10**6)}) as server:
        env = _environment(home, DINAT_NP_REGISTRY=str(registry), DINAT_NP_BASE_URL=server.url + "/stall")
        env.pop("DINAT_NP_OFFLINE")
        with tempfile.TemporaryFile() as err:
            process = subprocess.Popen([str(CLASSIFY), "--model", "stalling", str(DIGITS / "samples" / "digit_3.png")],
                                       stdout=subprocess.DEVNULL, stderr=err, env=env)
            try:
                deadline = time.monotonic() + TIMEOUT_S
                while not list(downloads.glob(".stalling.pth.*.part")) and time.monotonic() < deadline:
                    assert process.poll() is None, "the command ended before downloading"
                    time.sleep(0.05)
                assert list(downloads.glob(".stalling.pth.*.part")), "no download started"
                time.sleep(0.3)  # the first 1000 bytes arrive; the transfer then stalls
                process.send_signal(signal.SIGTERM)
                status = process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
    assert status == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert debris(home) == [] and not (downloads / "stalling.pth").exists()


# --------------------------------------------------------------------------------------------------
# dinat-convert
# --------------------------------------------------------------------------------------------------


def test_zero_stride_tensor_is_refused_before_allocating(tmp_path, home):
    """4 stored floats viewed as 400 million (1.6 GB) with stride 0."""
    src = torch_zip(tmp_path / "stride.pth", tensor_pickle(4, [400_000_000], [0]), bytes(16))
    check(convert(src, tmp_path / "out", home=home), 1,
          r"tensor of shape \(400000000,\) would bring the memory its tensors take to [\d,]+ bytes, beyond the",
          r"zero-stride", rss_mb=CONVERT_RSS_MB, folder=tmp_path)
    assert not (tmp_path / "out").exists()


def test_deflated_storage_is_refused_before_inflating(tmp_path, home):
    """512 MB of zeros deflate to about 2 MB: the storage's bytes are not in the file."""
    size = 512 * 2**20
    src = torch_zip(tmp_path / "deflated.pth", tensor_pickle(size // 4, [size // 4], [1]), size, zipfile.ZIP_DEFLATED)
    assert src.stat().st_size < 4 * 2**20
    check(convert(src, tmp_path / "out", home=home), 1,
          r"storage '0' would bring the memory its tensors take to 536,870,912 bytes",
          r"inflate far beyond their compressed size", rss_mb=CONVERT_RSS_MB, folder=tmp_path)


def test_scan_names_the_real_global(tmp_path, home):
    """Memo slots set by BINPUT count for MEMOIZE's numbering: this pickle calls posix.system, not torch.Size."""
    marker = tmp_path / "PWNED"
    pkl = (b"\x80\x04" + _text("posix") + b"q\x00"  # BINPUT 0
           + _text("torch") + b"\x94" + _text("system") + b"\x94" + _text("Size") + b"\x94"  # MEMOIZE 1, 2, 3
           + b"0000h\x00h\x02\x93" + _text(f"touch {marker}") + b"\x85R.")
    src = torch_zip(tmp_path / "evil.pth", pkl, b"")
    outcome = convert(src, tmp_path / "out", home=home)
    check(outcome, 1, r"references the global 'posix\.system'", rss_mb=CONVERT_RSS_MB, folder=tmp_path)
    assert "torch.Size" not in outcome.stderr and not marker.exists()


def test_headless_checkpoint_with_a_config_asking_for_classes(tmp_path, home):
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(DATA / "hf_dinat_small_cfg" / "model.safetensors").items()
               if not k.startswith("classifier.")}
    src = tmp_path / "headless.safetensors"
    save_file(tensors, src)
    config = json.loads((DATA / "hf_dinat_small_cfg" / "config.json").read_text())
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dict(config, num_labels=10, id2label={str(i): f"c{i}" for i in range(10)})))
    check(convert(src, tmp_path / "out", "--config", config_path, home=home), 1,
          r"num_labels: the checkpoint has no classification head, .*config\.json asks for 10 classes",
          rss_mb=CONVERT_RSS_MB, folder=tmp_path)
    assert not (tmp_path / "out").exists()


def test_output_under_a_file_is_named_plainly(tmp_path, home):
    (tmp_path / "file").write_text("not a folder")
    outcome = convert(DATA / "hf_dinat_small_cfg", tmp_path / "file" / "sub" / "out", home=home)
    check(outcome, 1, r"cannot create .*file/sub/out: .*file is a file, not a folder", rss_mb=CONVERT_RSS_MB)
    assert "Errno" not in outcome.stderr


def test_concurrent_conversions_into_one_new_folder(tmp_path, home):
    out = tmp_path / "out"
    outcomes: list[Outcome] = []
    threads = [threading.Thread(target=lambda dtype=dtype: outcomes.append(
        convert(DATA / "hf_dinat_small_cfg", out, "--dtype", dtype, home=home))) for dtype in ("float32", "float16")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.returncode for o in outcomes) == [0, 1], [o.stderr for o in outcomes]
    winner = next(o for o in outcomes if o.returncode == 0)
    loser = next(o for o in outcomes if o.returncode == 1)
    check(loser, 1, r"out (was created by another process during the conversion|exists and is not empty)",
          rss_mb=CONVERT_RSS_MB, folder=tmp_path)
    # The folder is the winner's, complete.
    dtype = re.search(r"\((float16|float32)\)", winner.out).group(1)
    assert json.loads((out / "conversion.json").read_text())["dtype"] == dtype
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "conversion.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# SIGINT gets Python's handler as in a terminal: a test run started in the background (``cmd &`` in a
# script) passes its children SIGINT ignored, which Python then keeps.
_SLOW_CONVERT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import dinat_np.convert as convert
real_write = convert.write_safetensors

def write_then_wait(*args, **kwargs):
    real_write(*args, **kwargs)
    print("staged", flush=True)
    time.sleep(120)

convert.write_safetensors = write_then_wait
from dinat_np.cli.convert import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_interrupted_conversion_leaves_nothing(tmp_path, home, signum, status, word):
    """Stopped while its staging folder holds the weights (dinat-convert's main, held at that point)."""
    process = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(DATA / "hf_dinat_small_cfg"),
                                str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=_environment(home))
    try:
        ready, _, _ = select.select([process.stdout], [], [], TIMEOUT_S)
        assert ready and process.stdout.readline() == b"staged\n", process.stderr.read().decode()
        assert len(list(tmp_path.glob(".out.*.partial"))) == 1
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = stderr.decode()
    assert process.returncode == status, stderr
    assert f"dinat-convert: {word}; no partial output was left behind" in stderr and "Traceback" not in stderr
    assert debris(tmp_path) == [] and not (tmp_path / "out").exists()


def test_stale_staging_of_a_killed_run_is_swept(tmp_path, home):
    """A SIGKILLed conversion's staging folder is removed by the next conversion to the same folder;
    one whose writer still runs (this test's process) is left alone."""
    from dinat_np import staging

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    stale = tmp_path / f".out.{staging._HOST}.{dead}.abcd1234.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(bytes(1000))
    live = tmp_path / f".out.{staging._HOST}.{os.getpid()}.efgh5678.partial"
    live.mkdir()
    check(convert(DATA / "hf_dinat_small_cfg", tmp_path / "out", home=home), 0, rss_mb=CONVERT_RSS_MB)
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# Fuzz pass: a child process per reader, with fixed seeds
# --------------------------------------------------------------------------------------------------

FUZZ_ROUNDS = 300


@pytest.mark.parametrize("kind", ["safetensors", "pth", "config"])
def test_fuzz(tmp_path, kind):
    # Numerical warnings are errors there: an overflow in a cast is a value that should have been refused.
    outcome = run(Path(sys.executable), "-W", "error::RuntimeWarning", __file__, "fuzz", kind, tmp_path,
                  env=_environment(tmp_path / "home"), timeout=TIMEOUT_S)
    check(outcome, 0, rss_mb=CLASSIFY_RSS_MB)
    summary = json.loads(outcome.stdout.splitlines()[-1])
    assert summary["rounds"] == FUZZ_ROUNDS
    assert summary["errors"] > 0 and summary["loaded"] > 0, summary  # both paths were taken


def _mutate_bytes(rng: np.random.Generator, data: bytes, region: tuple[int, int]) -> bytes:
    """Flip, overwrite, insert or delete a few bytes inside ``region``, or truncate the data."""
    blob = bytearray(data)
    start, stop = region
    choice = rng.integers(5)
    if choice == 4:
        return bytes(blob[: rng.integers(0, len(blob))])
    for _ in range(rng.integers(1, 4)):
        at = int(rng.integers(start, stop))
        if choice == 0:
            blob[at] ^= 1 << int(rng.integers(8))
        elif choice == 1:
            blob[at] = int(rng.integers(256))
        elif choice == 2:
            blob[at:at] = bytes(rng.integers(0, 256, rng.integers(1, 5), dtype=np.uint8))
        else:
            del blob[at: at + int(rng.integers(1, 5))]
    return bytes(blob)


_HOSTILE_VALUES = [0, -1, 1, 3, 2**31, 2**63, 10**30, -10**30, 1e308, -1e-308, 0.5, 1e8, True, None, "", "x",
                   [], {}, [1e9], [-1], [2**40, 2**40], [[1, 2]], {"a": 1}, "F32", "BF16", "I64", "NaN"]


def _mutate_safetensors(rng: np.random.Generator, data: bytes) -> bytes:
    header_length = struct.unpack("<Q", data[:8])[0]
    if rng.random() < 0.5:  # bytes of the length field, the header or the data
        region = [(0, 8), (8, 8 + header_length), (8 + header_length, len(data))][rng.integers(3)]
        return _mutate_bytes(rng, data, region)
    header = json.loads(data[8:8 + header_length])  # a structured change of one entry
    name = sorted(k for k in header if k != "__metadata__")[rng.integers(len(header) - 1)]
    field = ["dtype", "shape", "data_offsets", None][rng.integers(4)]
    value = _HOSTILE_VALUES[rng.integers(len(_HOSTILE_VALUES))]
    if field is None:
        header[name] = value
    elif field == "shape" and rng.random() < 0.5:
        header[name]["shape"] = [int(n) for n in rng.integers(0, 1 << 20, rng.integers(0, 4))]
    elif field == "data_offsets" and rng.random() < 0.5:
        begin = int(rng.integers(0, len(data)))
        header[name]["data_offsets"] = [begin, begin + int(rng.integers(0, 1 << 16))]
    else:
        header[name][field] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + header_length:]


def _fuzz_safetensors(rng: np.random.Generator, work: Path) -> bool:
    """Mutated digits-demo weights under its config: a clean error, or a model of the right shapes."""
    from dinat_np import DinatForImageClassification

    folder = work / "model"
    if not folder.exists():
        digits_copy(folder)
    weights = folder / "model.safetensors"
    weights.unlink()  # a new file: a map of the previous one may still be alive
    weights.write_bytes(_mutate_safetensors(rng, (DIGITS / "model.safetensors").read_bytes()))
    model = DinatForImageClassification.from_pretrained(folder)
    assert {k: v.shape for k, v in model.state_dict().items()} == _digits_shapes()
    return True


def _digits_shapes() -> dict[str, tuple[int, ...]]:
    from safetensors.numpy import load_file

    return {k: v.shape for k, v in load_file(DIGITS / "model.safetensors").items()}


def _pickle_int_positions(pkl: bytes) -> list[tuple[int, str]]:
    import pickletools

    return [(pos, op.name) for op, _arg, pos in pickletools.genops(pkl) if op.name in ("BININT", "BININT1", "BININT2")]


def _fuzz_pth(rng: np.random.Generator, work: Path) -> bool:
    """Mutated small torch checkpoint: raw bytes of the archive, or integers / bytes of its data.pkl."""
    from dinat_np.torch_pickle import load_torch_checkpoint

    source = DATA / "original_nat_layerscale" / "checkpoint.pth"
    path = work / "mutated.pth"
    if rng.random() < 0.3:
        data = source.read_bytes()
        path.write_bytes(_mutate_bytes(rng, data, (0, len(data))))
    else:
        with zipfile.ZipFile(source) as archive:
            entries = {info.filename: archive.read(info) for info in archive.infolist()}
        name = next(n for n in entries if n.endswith("/data.pkl"))
        pkl = entries[name]
        positions = _pickle_int_positions(pkl)
        if rng.random() < 0.6 and positions:
            pos, op = positions[rng.integers(len(positions))]
            width = {"BININT": 4, "BININT1": 1, "BININT2": 2}[op]
            value = int(rng.choice([0, 1, 2, 255, 2**15, 2**31 - 1, int(rng.integers(0, 1 << (8 * width)))]))
            value %= 1 << (8 * width)
            pkl = pkl[: pos + 1] + value.to_bytes(width, "little") + pkl[pos + 1 + width:]
        else:
            pkl = _mutate_bytes(rng, pkl, (0, len(pkl)))
        entries[name] = pkl
        with zipfile.ZipFile(path, "w") as archive:
            for entry, blob in entries.items():
                archive.writestr(entry, blob)
    tensors = load_torch_checkpoint(path)
    assert all(isinstance(t, np.ndarray) for t in tensors.values())
    assert sum(t.nbytes for t in tensors.values()) <= 4 * path.stat().st_size + 64 * 2**20
    return True


def _fuzz_config(rng: np.random.Generator, work: Path) -> bool:
    """config.json or preprocessor_config.json of the digits-demo folder: one field set to a hostile value,
    or bytes of the file changed; then the model and its processor are loaded."""
    from dinat_np import DinatForImageClassification
    from dinat_np.preprocessing import ImageProcessor

    folder = work / "model"
    if not folder.exists():
        digits_copy(folder)
    name = "config.json" if rng.random() < 0.7 else "preprocessor_config.json"
    original = (DIGITS / name).read_text()
    if rng.random() < 0.75:
        data = json.loads(original)
        key = sorted(data)[rng.integers(len(data))]
        data[key] = _HOSTILE_VALUES[rng.integers(len(_HOSTILE_VALUES))]
        text = json.dumps(data)
    else:
        text = _mutate_bytes(rng, original.encode(), (0, len(original))).decode("utf-8", "replace")
    for other in ("config.json", "preprocessor_config.json"):
        shutil.copy(DIGITS / other, folder / other)
    (folder / name).write_text(text)
    model = DinatForImageClassification.from_pretrained(folder)
    processor = ImageProcessor.from_pretrained(folder)
    assert model.config.parameter_count() == sum(t.size for t in model.state_dict().values())
    assert processor(np.zeros((8, 8, 3), np.uint8)).ndim == 4
    return True


def fuzz_main(kind: str, work: Path) -> int:
    """Run the fuzz rounds; print a JSON summary. An unexpected exception type ends the run with a traceback."""
    fuzz = {"safetensors": _fuzz_safetensors, "pth": _fuzz_pth, "config": _fuzz_config}[kind]
    rng = np.random.default_rng({"safetensors": 2101, "pth": 2102, "config": 2103}[kind])
    counts = {"rounds": 0, "loaded": 0, "errors": 0}
    for _ in range(FUZZ_ROUNDS):
        counts["rounds"] += 1
        try:
            fuzz(rng, work)
            counts["loaded"] += 1
        except (ValueError, OSError) as error:
            if not str(error).strip():
                raise AssertionError(f"{type(error).__name__} without a message") from error
            counts["errors"] += 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "fuzz":
        sys.exit(fuzz_main(sys.argv[2], Path(sys.argv[3])))
    sys.exit(f"usage: {sys.argv[0]} fuzz safetensors|pth|config WORK_DIR")
