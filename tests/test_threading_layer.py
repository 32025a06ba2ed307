"""Which Numba threading layer the CPU kernels run on (chosen once per process, so each case is a child)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A child that optionally imports something first, then runs one parallel kernel and reports.
CHILD = """
import json, os, sys
if sys.argv[1]:
    __import__(sys.argv[1])
import numba
import numpy as np
from dinat_np.kernels import cpu
rng = np.random.default_rng(0)
cpu.layer_norm(rng.standard_normal((8, 16)).astype(np.float32), np.ones(16, np.float32),
               np.zeros(16, np.float32), 1e-5)
print(json.dumps({"layer": numba.threading_layer(), "spin": os.environ.get("GOMP_SPINCOUNT")}))
"""


def run_child(first_import: str = "", **environment: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(environment)
    done = subprocess.run([sys.executable, "-c", CHILD, first_import], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def gnu_openmp_available() -> bool:
    probe = "from numba.np.ufunc import omppool; print(omppool.openmp_vendor)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and done.stdout.strip() == "GNU"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP is only chosen on Linux")
def test_fresh_process_uses_gnu_openmp_with_a_short_spin():
    report = run_child()
    if gnu_openmp_available():
        assert report == {"layer": "omp", "spin": "3000"}
    else:
        assert report["layer"] == "workqueue"


def test_an_explicit_spin_count_is_kept():
    report = run_child(GOMP_SPINCOUNT="1234")
    assert report["spin"] == "1234"


def test_environment_choice_wins():
    assert run_child(NUMBA_THREADING_LAYER="workqueue")["layer"] == "workqueue"


def test_openmp_runtime_loaded_before_falls_back_to_workqueue():
    # The torch CPU wheel brings its own libgomp.so.1, which has read its spin settings already:
    # GNU OpenMP's default spin would fight OpenBLAS for the cores.
    pytest.importorskip("torch")
    assert run_child("torch")["layer"] == "workqueue"
