"""The first run on a machine: kernels compiled for a baseline x86-64 (or any named CPU) give the same
scores, and dinat-classify says why the first images take long, once, and only while it compiles."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dinat_np.cli.classify import COMPILING_NOTICE

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "weights" / "digits-demo" / "samples"
CLASSIFY = Path(sys.executable).with_name("dinat-classify")


def classify(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([str(CLASSIFY), "--model", "digits-demo", "--json", *args], capture_output=True,
                          text=True, env=environment, timeout=600)


def scores(outcome: subprocess.CompletedProcess) -> list[list[float]]:
    assert outcome.returncode == 0, outcome.stderr
    return [[p["score"] for p in record["predictions"]] for record in json.loads(outcome.stdout)]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the generic x86-64 target")
def test_a_baseline_x86_64_build_gives_the_same_scores_and_says_it_is_compiling(tmp_path: Path) -> None:
    images = [str(SAMPLES / "digit_3.png"), str(SAMPLES / "digit_7.png")]
    host = classify(*images)
    warm = classify(*images)  # the host's kernels are cached now
    assert COMPILING_NOTICE not in warm.stderr
    # An empty cache and Numba's baseline x86-64 CPU (no AVX): every kernel compiles again, on 16-lane
    # vector code that LLVM splits into SSE registers; the own product stays off (no AVX-512 features).
    generic = classify(*images, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    assert generic.stderr.count(COMPILING_NOTICE) == 1
    for expected, got in zip(scores(host), scores(generic), strict=True):
        assert got == pytest.approx(expected, abs=1e-5)
