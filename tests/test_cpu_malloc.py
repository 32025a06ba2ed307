"""glibc's malloc thresholds, raised by the CPU backend's set-up (each case a child process: they are
process-wide)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="the thresholds are glibc's",
)

# Obtains the CPU backend (which sets the process up), writes a freshly allocated 40 MB array twice (freed
# in between) and reports the page faults of the second.
CHILD = r"""
import json, resource
import numpy as np
from dinat_np.kernels import get_backend
cpu = get_backend("cpu")

def faults_writing(values):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    array = np.empty(values, np.float32)
    array.fill(1.5)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

values = 10 << 20
faults_writing(values)
print(json.dumps({"tuned": cpu.set_up_process().malloc_tuned, "faults": faults_writing(values)}))
"""


def run_child(**environment: str) -> dict:
    env = {name: value for name, value in os.environ.items()
           if name not in ("GLIBC_TUNABLES", "DINAT_NP_MALLOPT") and not name.startswith("MALLOC_")}
    env.update(environment)
    completed = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_freed_activations_are_reused_without_page_faults():
    report = run_child()
    assert report["tuned"] is True
    # glibc's defaults map the array afresh: 532 faults on the development VM (transparent huge pages),
    # one per 4 KiB page (10240) without them
    assert report["faults"] < 64, report


@pytest.mark.parametrize("environment", [
    {"DINAT_NP_MALLOPT": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
    {"MALLOC_MMAP_THRESHOLD_": "1048576"},
])
def test_a_choice_in_the_environment_is_left_alone(environment):
    assert run_child(**environment)["tuned"] is False
