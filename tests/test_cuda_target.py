"""``device='cuda'`` refuses numba's own deprecated CUDA target with a clear message.

numba-cuda replaces ``numba.cuda`` through an import hook that its .pth file installs at start-up; a
numba-cuda put on ``sys.path`` by hand never installs it, and numba's own target then fails on the
kernels with "Signature mismatch: 2 argument types given". The child process removes the hook to get
that situation.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _numba_has_own_cuda_target() -> bool:
    numba_spec = importlib.util.find_spec("numba")
    return numba_spec is not None and any(
        (Path(location) / "cuda" / "__init__.py").is_file() for location in numba_spec.submodule_search_locations
    )


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
@pytest.mark.skipif(not _numba_has_own_cuda_target(), reason="this numba has no CUDA target of its own")
def test_numba_own_cuda_target_is_a_clear_error() -> None:
    script = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != 'NumbaCudaFinder']\n"
        "from dinat_np.kernels import get_backend\n"
        "try:\n"
        "    get_backend('cuda')\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "RuntimeError: device='cuda' needs numba-cuda" in completed.stdout
    assert "numba's own deprecated CUDA target" in completed.stdout
    assert "_numba_cuda_redirector.pth" in completed.stdout
