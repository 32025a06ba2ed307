"""The first run on a machine: kernels compiled for a baseline x86-64 (or any named CPU) give the same
scores, and dinat-classify says why the first images take long, once, and only while it compiles."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinat_np.cli.classify import COMPILING_NOTICE
from tests.helpers.paths import REPO

DEMO = REPO / "weights" / "digits-demo"
SAMPLES = DEMO / "samples"
CLASSIFY = Path(sys.executable).with_name("dinat-classify")


def classify(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([str(CLASSIFY), "--model", "digits-demo", "--json", *args], capture_output=True,
                          text=True, env=environment, timeout=600)


def scores(outcome: subprocess.CompletedProcess) -> list[list[float]]:
    assert outcome.returncode == 0, outcome.stderr
    return [[p["score"] for p in record["predictions"]] for record in json.loads(outcome.stdout)]


# Numba's baseline x86-64 CPU (no AVX): 8-lane vector code that LLVM splits into SSE registers, the
# products on OpenBLAS. A Haswell (AVX2 and FMA, no AVX-512: most laptops): 8-lane vectors, the own product
# on 16-column panels.
@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
@pytest.mark.parametrize("target", ["generic", "avx2"])
def test_another_x86_64_build_gives_the_same_scores_and_says_it_is_compiling(tmp_path: Path, target: str) -> None:
    from benchmarks.bench_cpu import avx2_unavailable, target_environment

    unavailable = avx2_unavailable() if target == "avx2" else None
    if unavailable:
        pytest.skip(unavailable)
    images = [str(SAMPLES / "digit_3.png"), str(SAMPLES / "digit_7.png")]
    host = classify(*images)
    warm = classify(*images)  # the host's kernels are cached now
    assert COMPILING_NOTICE not in warm.stderr
    # an empty cache: every kernel compiles again, for that CPU
    other = classify(*images, **target_environment(target), NUMBA_CACHE_DIR=str(tmp_path))
    assert other.stderr.count(COMPILING_NOTICE) == 1
    for expected, got in zip(scores(host), scores(other), strict=True):
        assert got == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The cold start in two processes (dinat_np.kernels.cpu.compile)
# ---------------------------------------------------------------------------------------------------------
def run_child(script: str, cache: Path) -> dict:
    """Run ``script`` in a fresh Python with an empty Numba cache ``cache``; its last stdout line is JSON."""
    outcome = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "NUMBA_CACHE_DIR": str(cache)}, cwd=REPO)
    assert outcome.returncode == 0, outcome.stderr
    return json.loads(outcome.stdout.splitlines()[-1])


FIRST_FORWARD = f"""
import json
import numpy as np
from numba.core import event
from dinat_np import DinatForImageClassification
from dinat_np.kernels.cpu import compile

model = DinatForImageClassification.from_pretrained({str(DEMO)!r})
x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
model._kernels_ready = True  # compile_for is called here, to see what it did
startup = compile.compile_for(lambda: model(x))

class Count(event.Listener):
    compiled = []
    def on_start(self, ev):
        self.compiled.append(ev.data["dispatcher"].py_func.__name__)
    def on_end(self, ev):
        pass

counter = Count()
with event.install_listener("numba:compile", counter):
    logits = model(x).logits
print(json.dumps({{"startup": startup._asdict(), "compiled_in_forward": counter.compiled,
                  "logits": logits.tolist()}}))
"""


@pytest.mark.slow
def test_a_cold_start_in_two_processes_compiles_what_the_forward_launches_and_gives_the_warm_scores(
    tmp_path: Path,
) -> None:
    from dinat_np import DinatForImageClassification

    model = DinatForImageClassification.from_pretrained(DEMO)
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    warm = model(x).logits  # this process: the test session's cache

    cold = run_child(FIRST_FORWARD, tmp_path)
    startup = cold["startup"]
    assert cold["compiled_in_forward"] == []  # the recording found every kernel with its signature
    assert startup["compiled_by_helper"] and startup["compiled_here"] and not startup["helper_failed"]
    assert sorted(startup["compiled_here"] + startup["compiled_by_helper"]) == sorted(startup["kernels"])
    assert {"_na_fused", "_na_whole_groups", "_linear", "_conv3x3_s2", "_layer_norm", "_na_sliding_band",
            "_na_whole_groups_band", "_epilogue_rows", "_direct_conv_rows"} <= set(startup["kernels"])
    np.testing.assert_array_equal(np.array(cold["logits"]), warm)

    again = run_child(FIRST_FORWARD, tmp_path)  # the same cache, warm now: nothing to compile
    assert again["startup"]["compiled_here"] == [] and again["startup"]["compiled_by_helper"] == []
    assert again["compiled_in_forward"] == []
    # bit for bit: the kernels call their bands through pointers, so a process runs the same code whether it
    # compiled them or loaded them from the cache (band.py)
    np.testing.assert_array_equal(np.array(again["logits"]), np.array(cold["logits"]))


# Two cheap kernels (LayerNorm's and the im2col gather), so that each case compiles in a few seconds.
FALLBACK = """
import json, os, subprocess, sys, warnings
import numpy as np
from dinat_np.kernels import cpu
from dinat_np.kernels.common import Norm
from dinat_np.kernels.cpu import compile, conv

rng = np.random.default_rng(5)
x = rng.standard_normal((1, 6, 6, 20)).astype(np.float32)
norm = Norm(rng.standard_normal(20).astype(np.float32), rng.standard_normal(20).astype(np.float32), 1e-5)
cols = np.empty((9, 180), np.float32)

def forward():
    normed = cpu.layer_norm(x, norm)
    with cpu.threads.launching():
        conv._im2col_rows(x.reshape(-1), x.shape, (720, 120, 20, 1), 0, 9, cols, 0)
    return normed

helpers, events = [], []
start_helper, record = compile._start_helper, compile.kernels_launched_by
def recorded_start():
    started = start_helper()
    helpers.extend(started[:1] if started else [])
    events.extend(["helper"] if started else [])
    return started
compile._start_helper = recorded_start
compile.kernels_launched_by = lambda forward: events.append("recording") or record(forward)
compile.HELPER_START_SECONDS = 0.0  # so that the helper gets one of the two
CASE
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    startup = compile.compile_for(forward)
    compile.compile_for(forward)  # the kernels are compiled now: no helper
normed = forward()
mean = x.mean(-1, keepdims=True)
expected = (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * norm.weight + norm.bias
print(json.dumps({"startup": startup._asdict(), "error": float(abs(normed - expected).max()),
                  "patch": cols[4].tolist() == x[0, 1:4, 1:4].reshape(-1).tolist(),
                  "helpers_running": [h.poll() is None for h in helpers], "events": events,
                  "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}))
"""

CASES = {
    "helper delivers": "",
    "no helper starts": "sys.executable = os.path.join(os.sep, 'no', 'python')",
    "helper fails": (
        "compile._helper_command = lambda: [sys.executable, '-c', "
        "'import sys; sys.stderr.write(\"LLVM ERROR: out of registers\"); raise SystemExit(3)']"),
    "helper hangs": (
        "compile.HELPER_TIMEOUT_SECONDS = 1.0\n"
        "compile._helper_command = lambda: [sys.executable, '-c', 'import time; time.sleep(60)']"),
    "cache not writable": "compile._cache_writable = lambda kernels: False",
    "one usable CPU": "import numba; numba.config.NUMBA_DEFAULT_NUM_THREADS = 1",  # a helper would only share it
}


@pytest.mark.parametrize("case", CASES)
def test_the_cold_start_falls_back_to_compiling_here(case: str, tmp_path: Path) -> None:
    result = run_child(FALLBACK.replace("CASE", CASES[case]), tmp_path)
    startup = result["startup"]
    assert startup["kernels"] == ["_layer_norm", "_im2col_rows"]
    assert result["error"] < 1e-5 and result["patch"]
    assert result["helpers_running"] == [False] * len(result["helpers_running"])  # nothing left running
    if case == "helper delivers":
        assert len(startup["compiled_by_helper"]) == 1 and not startup["helper_failed"]
        assert result["warnings"] == []
        # the cache was empty: the helper started before the recording (it imports meanwhile); then warm
        assert result["events"] == ["helper", "recording", "recording"]
    elif case in ("helper fails", "helper hangs"):
        assert len(startup["compiled_by_helper"]) == 1 and startup["helper_failed"]
        expected = {"helper fails": "exit status 3: LLVM ERROR: out of registers",
                    "helper hangs": "still running after 1 s"}[case]
        assert expected in startup["helper_problem"]
        assert [expected in w for w in result["warnings"]] == [True]  # said once, with what went wrong
    else:  # no helper: everything compiled here
        assert startup["compiled_here"] == startup["kernels"] and startup["compiled_by_helper"] == []
        if case == "one usable CPU":
            assert "helper" not in result["events"]  # not even started


def test_the_recording_runs_no_kernel_and_puts_the_dispatchers_back() -> None:
    from numba.core.dispatcher import Dispatcher

    from dinat_np import DinatForImageClassification
    from dinat_np.kernels.cpu import attention, compile
    from dinat_np.kernels.cpu.band import Band

    model = DinatForImageClassification.from_pretrained(DEMO)
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    kernels = compile.kernels_launched_by(lambda: model(x))
    names = [k.name for k in kernels]
    assert len(names) == len(set(names))  # one signature each
    assert {"_na_fused", "_na_whole_groups", "_linear", "_conv3x3_s2", "_layer_norm"} <= set(names)
    assert "_mlp" not in names  # 64 rows at most: the MLP's products run as two linears
    assert {"_na_sliding_band", "_na_whole_groups_band", "_epilogue_rows", "_direct_conv_rows"} <= set(names)
    assert all(k.stand_ins is not None for k in kernels)
    assert isinstance(attention._na_fused, Dispatcher) and isinstance(attention.window_starts, Dispatcher)
    assert isinstance(attention._na_sliding_band, Band)


def test_the_split_gives_the_helper_a_balanced_share() -> None:
    from dinat_np.kernels.cpu.compile import Kernel, split

    kernels = [Kernel("m", name, (), ()) for name in ("_layer_norm", "_na_whole_groups", "_linear", "_na_fused",
                                                      "_conv3x3_s2", "_mlp")]
    kernels.append(Kernel("m", "_unpicklable", (), None))
    here, helper = split(kernels, helper_late=1.0)
    assert "_na_whole_groups" in [k.name for k in here] and "_unpicklable" in [k.name for k in here]
    assert sorted(here + helper) == sorted(kernels)
    seconds = [sum(compile_seconds(k) for k in share) for share in (here, helper)]
    assert abs(seconds[0] - seconds[1]) < 5.0
    _, late_helper = split(kernels, helper_late=3.0)  # a helper ready 3 s late gets less
    assert sum(compile_seconds(k) for k in late_helper) < seconds[1]


def compile_seconds(kernel) -> float:
    from dinat_np.kernels.cpu.compile import COMPILE_SECONDS, UNLISTED_SECONDS

    return COMPILE_SECONDS.get(kernel.name, UNLISTED_SECONDS)


def test_a_first_call_inside_a_recording_is_recorded_there_only() -> None:
    # a classifier's first call records its forward, which makes its base model's first call
    from dinat_np.kernels.cpu import compile

    calls = []

    def inner() -> None:
        calls.append("inner forward")

    def outer() -> None:
        calls.append(compile.compile_for(inner))
        inner()

    compile.compile_for(outer)
    assert calls == [compile.Startup((), (), (), False), "inner forward"]


BAND_IN_A_FRESH_PROCESS = """
import json
from numba.core import event
from dinat_np.kernels.cpu import products

class Count(event.Listener):
    compiled = 0
    def on_start(self, ev):
        Count.compiled += 1
    def on_end(self, ev):
        pass

with event.install_listener("numba:compile", Count()):
    products._epilogue_rows.HOW()
print(json.dumps({"compiled": Count.compiled}))
"""


def test_a_band_has_one_cache_entry_whichever_way_a_process_asks_for_it(tmp_path: Path) -> None:
    # compile_for and its helper compile a band; a kernel's launch asks for its address: the same entry
    first = run_child(BAND_IN_A_FRESH_PROCESS.replace("HOW", "compile"), tmp_path)
    second = run_child(BAND_IN_A_FRESH_PROCESS.replace("HOW", "address"), tmp_path)
    assert first["compiled"] >= 1 and second["compiled"] == 0
