"""Both backends satisfy the contract of ``dinat_np.kernels.backend.Backend``, and the CPU backend's package
changes nothing in the process until its set-up runs.

The CUDA backend is checked in a child process with ``NUMBA_ENABLE_CUDASIM=1`` (it must be set before
numba.cuda is first imported, see tests/test_cuda_sim.py); the child imports this module for the check.
"""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dinat_np.kernels.cpu import blas

from dinat_np.kernels.backend import Backend

ROOT = Path(__file__).resolve().parent.parent

# What each backend offers besides the contract's ops.
EXTRAS = {"cpu": {"set_up_process", "set_num_threads"}, "cuda": {"require_gpu"}}


def contract_ops() -> list[str]:
    """The ops of the contract: the Protocol's own public methods."""
    return sorted(name for name, value in vars(Backend).items()
                  if inspect.isfunction(value) and not name.startswith("_"))


def _parameters(function: object) -> list[tuple[str, str, str]]:
    """(name, kind, default) of each parameter but ``self``; defaults as repr, ``-`` where there is none."""
    return [
        (p.name, p.kind.name, "-" if p.default is inspect.Parameter.empty else repr(p.default))
        for p in inspect.signature(function).parameters.values() if p.name != "self"
    ]


def contract_mismatches(backend: ModuleType, extras: set[str]) -> list[str]:
    """Every way ``backend`` departs from the contract: an op missing or not a function, parameters that
    differ from the Protocol's in name, kind or default, a public name (``__all__``) beyond the ops and
    ``extras``. Empty when it satisfies the contract."""
    problems = []
    for name in contract_ops():
        function = getattr(backend, name, None)
        if not inspect.isfunction(function):
            problems.append(f"{name}: missing or not a function")
        elif _parameters(function) != _parameters(getattr(Backend, name)):
            problems.append(f"{name}: parameters {_parameters(function)}, "
                            f"the contract's {_parameters(getattr(Backend, name))}")
    offered = set(getattr(backend, "__all__", ()))
    if offered != set(contract_ops()) | extras:
        problems.append(f"__all__ differs from the ops and {sorted(extras)}: "
                        f"{sorted(offered ^ (set(contract_ops()) | extras))}")
    return problems


def test_the_contract_lists_every_op_the_models_use():
    assert contract_ops() == sorted([
        "upload", "download", "linear_weight", "conv_weight", "nchw_to_nhwc", "layer_norm", "linear",
        "linear_residual", "mlp_residual", "conv3x3_stride2", "neighborhood_attention", "na_qk", "na_av",
        "pad_bottom_right", "crop", "mean_pool", "patch_embedding", "patch_merging", "global_attention",
    ])


def test_the_cpu_backend_satisfies_the_contract():
    from dinat_np.kernels import cpu, get_backend

    assert contract_mismatches(cpu, EXTRAS["cpu"]) == []
    assert isinstance(cpu, Backend)
    assert get_backend("cpu") is cpu


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
def test_the_cuda_backend_satisfies_the_contract():
    script = ("import json\nfrom dinat_np.kernels import cuda\nfrom tests import test_backend_contract as contract\n"
              "print(json.dumps(contract.contract_mismatches(cuda, contract.EXTRAS['cuda'])))\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# Imports the whole CPU package, reports what the process looks like, sets it up, and reports again: the
# environment, Numba's threading layer and pool, libgomp, and the page faults of writing a freshly
# allocated 40 MB array a second time (glibc maps it afresh until the set-up raises its thresholds).
SET_UP_CHILD = r"""
import json, os, resource
import numba
import numpy as np
import dinat_np  # the top-level package's import changes nothing either

def faults_writing(values):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    array = np.empty(values, np.float32)
    array.fill(1.5)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def state():
    faults_writing(10 << 20)
    try:
        pool = numba.threading_layer()
    except ValueError:
        pool = None
    return {"environment": dict(os.environ), "configured_layer": numba.config.THREADING_LAYER, "pool": pool,
            "libgomp": any("/libgomp.so" in line for line in open("/proc/self/maps")),
            "faults": faults_writing(10 << 20)}

before = state()
from dinat_np.kernels import cpu
from dinat_np.kernels.cpu import attention, blas, conv, gemm, layout, malloc, norm, products, simd, threads
imported = state()
set_up = cpu.set_up_process()
print(json.dumps({"before": before, "imported": imported, "set_up": set_up._asdict(), "after": state(),
                  "again": cpu.set_up_process() is set_up}))
"""

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not GLIBC, reason="the child reads /proc/self/maps and glibc's malloc behaviour")
def test_importing_the_cpu_backend_changes_nothing_until_its_set_up():
    env = {name: value for name, value in os.environ.items()
           if name not in ("NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "GLIBC_TUNABLES",
                           "DINAT_NP_MALLOPT") and not name.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", SET_UP_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    before, imported, after = report["before"], report["imported"], report["after"]

    for key in ("environment", "configured_layer", "pool", "libgomp"):
        assert imported[key] == before[key], key
    assert before["pool"] is None
    assert imported["faults"] >= 0.5 * before["faults"]  # still glibc's defaults: mapped afresh every time

    assert report["set_up"]["malloc_tuned"] is True
    assert after["faults"] < 64 and after["faults"] < before["faults"]
    layer = report["set_up"]["threading_layer"]
    assert layer in ("omp", "workqueue")
    assert after["environment"]["NUMBA_THREADING_LAYER"] == after["configured_layer"] == layer
    assert report["again"] is True  # once per process


# NumPy (and its OpenBLAS) loaded before dinat_np, with no spin setting: the set-up gives OpenBLAS the
# short idle spin through its own API, and NumPy's multi-threaded products still give the right numbers.
SPIN_CHILD = r"""
import ctypes, json, os
import numpy as np
from dinat_np.kernels.cpu import blas
library = ctypes.CDLL(str(blas._bundled_openblas()[0]))
rng = np.random.default_rng(0)
a, b = rng.standard_normal((512, 512)), rng.standard_normal((512, 512))
expected = a @ b
loaded_with = library.openblas_thread_timeout()
from dinat_np.kernels import get_backend
get_backend("cpu")
print(json.dumps({"loaded_with": loaded_with, "now": library.openblas_thread_timeout(),
                  "acted": get_backend("cpu").set_up_process().openblas_spin_bounded,
                  "products_agree": bool(np.allclose(a @ b, expected, rtol=0, atol=1e-9))}))
"""


@pytest.mark.skipif(not blas._bundled_openblas(), reason="NumPy without its bundled OpenBLAS")
@pytest.mark.parametrize("setting, expected", [(None, blas.THREAD_TIMEOUT), ("10", 10)])
def test_numpy_first_openblas_gets_the_short_spin_unless_the_user_chose(setting, expected):
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_THREAD_TIMEOUT"}
    if setting is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = setting
    done = subprocess.run([sys.executable, "-c", SPIN_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["now"] == expected and report["products_agree"]
    assert report["acted"] is (setting is None)
