"""Which Numba threading layer the CPU kernels run on (chosen once per process, so each case is a child)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# A child process: optionally imports a module or starts Numba's pool first, obtains the CPU backend (its
# set-up chooses the layer; with ``direct``, only imports the package, and the first launch sets it up),
# optionally changes a NUMBA_* variable and compiles something (Numba then re-reads its configuration),
# runs one kernel, optionally forks and runs one in the fork, and reports.
CHILD = r"""
import json, os, sys, warnings
first, start_pool_first, reload_config, fork, direct = sys.argv[1], *map(int, sys.argv[2:6])
if first:
    __import__(first)
import numba
import numpy as np

if start_pool_first:
    @numba.njit(parallel=True)
    def bump(x):
        for i in numba.prange(x.shape[0]):
            x[i] += 1.0
    bump(np.ones(4))
preloaded = any("/libgomp.so" in line for line in open("/proc/self/maps"))
from dinat_np.kernels.common import Norm
rng = np.random.default_rng(0)
def kernel():
    norm = Norm(np.ones(16, np.float32), np.zeros(16, np.float32), 1e-5)
    return cpu.layer_norm(rng.standard_normal((8, 16)).astype(np.float32), norm)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if direct:
        from dinat_np.kernels import cpu
        kernel()
    else:
        from dinat_np.kernels import get_backend
        cpu = get_backend("cpu")
if reload_config:
    os.environ["NUMBA_OPT"] = "2"
    numba.njit(lambda v: v + 1)(1)
kernel()
report = {"layer": numba.threading_layer(), "spin": os.environ.get("GOMP_SPINCOUNT"),
          "env_layer": os.environ.get("NUMBA_THREADING_LAYER"), "preloaded": preloaded,
          "warned": any(issubclass(w.category, RuntimeWarning) for w in caught)}
if fork:
    pid = os.fork()
    if pid == 0:
        try:
            kernel()
        except RuntimeError as error:
            os._exit(3 if "forked" in str(error) else 4)
        os._exit(0)
    report["fork_exit"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(report))
"""

LINUX = sys.platform.startswith("linux")


def run_child(first_import: str = "", start_pool_first: bool = False, reload_config: bool = False,
              fork: bool = False, direct: bool = False, **environment: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(environment)
    flags = [str(int(flag)) for flag in (start_pool_first, reload_config, fork, direct)]
    done = subprocess.run([sys.executable, "-c", CHILD, first_import, *flags], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def gnu_openmp_available() -> bool:
    probe = "from numba.np.ufunc import omppool; print(omppool.openmp_vendor)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and done.stdout.strip() == "GNU"


def expected_layer(report: dict) -> str:
    """The rule: GNU OpenMP on Linux unless a libgomp was loaded before the kernels were."""
    return "omp" if LINUX and not report["preloaded"] and gnu_openmp_available() else "workqueue"


needs_proc_maps = pytest.mark.skipif(not LINUX, reason="the child reads /proc/self/maps")


@needs_proc_maps
def test_fresh_process_follows_the_rule_and_passes_it_on():
    from dinat_np.kernels.cpu.gemm import PRODUCTS

    report = run_child()
    layer = expected_layer(report)
    assert report["layer"] == report["env_layer"] == layer  # written down for Numba and child processes
    # a longer spin only where the products run inside the kernels, with no OpenBLAS pool to yield to
    spin = "3000" if PRODUCTS == "numpy" else "30000"
    assert report["spin"] == (spin if layer == "omp" else None)


@needs_proc_maps
def test_a_direct_user_of_the_package_gets_the_same_choice_at_its_first_launch():
    report = run_child(direct=True)
    assert report["layer"] == report["env_layer"] == expected_layer(report)


@needs_proc_maps
def test_products_through_numpy_keep_the_short_spin():
    report = run_child(DINAT_NP_NUMPY_BLAS="1")
    assert report["spin"] == ("3000" if expected_layer(report) == "omp" else None)


@needs_proc_maps
def test_the_choice_survives_numba_rereading_its_configuration():
    report = run_child(reload_config=True)
    assert report["layer"] == expected_layer(report)


@needs_proc_maps
def test_the_users_spin_settings_are_left_alone():
    assert run_child(GOMP_SPINCOUNT="1234")["spin"] == "1234"
    report = run_child(OMP_WAIT_POLICY="PASSIVE")
    assert report["spin"] is None and report["layer"] == expected_layer(report)


@needs_proc_maps
def test_environment_choice_wins():
    assert run_child(NUMBA_THREADING_LAYER="workqueue")["layer"] == "workqueue"


@needs_proc_maps
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
@pytest.mark.torch
def test_openmp_runtime_loaded_before_means_workqueue():
    # The torch CPU wheel brings its own libgomp.so.1, which has read its spin settings already:
    # GNU OpenMP's default spin would fight OpenBLAS for the cores.
    report = run_child("torch")
    assert report["layer"] == expected_layer(report)
    if report["preloaded"]:
        assert report["layer"] == "workqueue"


@needs_proc_maps
def test_a_pool_started_on_openmp_before_the_kernels_is_warned_about():
    report = run_child(start_pool_first=True)
    assert report["warned"] == (report["layer"] == "omp")


@needs_proc_maps
def test_forked_child_gets_a_clear_error_on_openmp_and_runs_on_workqueue():
    report = run_child(fork=True)
    assert report["fork_exit"] == (3 if report["layer"] == "omp" else 0)
    assert run_child(fork=True, NUMBA_THREADING_LAYER="workqueue")["fork_exit"] == 0
