"""The CUDA backend against the CPU backend, in numba.cuda's simulator (and on a real GPU when there is one).

``NUMBA_ENABLE_CUDASIM`` must be set before numba.cuda is first imported, so the checks run in child
processes (``tests/cuda_sim_checks.py``); this pytest process keeps the real CPU backend. Each child
prints the largest absolute difference of every check, and the tests below hold them to 1e-4.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "cuda_sim_checks.py"
ATOL = 1e-4

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(not HAVE_NUMBA_CUDA,
                                      reason="numba-cuda is not installed (pip install numba-cuda)")

NA_CASES = [
    "b1_7x9_h2_d5_k3_dil1", "b2_9x8_h1_d6_k3_dil2", "b1_11x11_h1_d4_k5_dil1", "b1_6x7_h1_d40_k3_dil2",
    "b1_10x9_h2_d3_k3_dil3", "b1_8x9_h1_d33_k7_dil1",
]
KERNEL_CHECKS = [
    "upload_download", "nchw_to_nhwc", "pad_bottom_right", "crop", "mean_pool", "mean_pool_wide", "layer_norm_c5",
    "layer_norm_c70",
    "linear_identity", "linear_gelu", "linear_gelu_new", "linear_relu", "linear_selu",
    "linear_residual_out", "linear_residual_normed", "linear_residual_no_norm_out",
    "linear_residual_no_norm_normed_is_none", "mlp_residual_out", "mlp_residual_normed", "mlp_residual_no_norm_out",
    "mlp_residual_no_norm_normed_is_none", "linear_tile64_gelu", "external_gemm_selu",
    "external_gemm_residual_out", "external_gemm_residual_normed", "conv3x3_stride2",
    "conv3x3_stride2_nobias", "na_fused_no_attn", "na_fused_no_attn_returns_none", "two_threads_layer_norm_linear",
    "na_fused_qkv_bias_out", "na_fused_qkv_bias_attn", "na_fused_qkv_bias_no_attn", "na_kernel_size_limit_is_clear",
    "patch_embedding_p4", "patch_embedding_p3_nobias", "patch_merging_odd", "patch_merging_even",
    "global_attention_out", "global_attention_attn", "global_attention_odd_no_attn",
    "global_attention_no_attn_returns_none",
] + [f"{op}_{case}" for case in NA_CASES for op in ("na_fused_out", "na_fused_attn", "na_qk", "na_av")]
MODEL_CHECKS = (
    ["model_device_is_cuda", "model_logits", "model_output_counts", "model_pickled_device_is_cuda",
     "model_pickled_logits", "backbone_to_cuda_device"]
    + [f"model_hidden_states_{i}" for i in range(5)]
    + [f"model_reshaped_hidden_states_{i}" for i in range(5)]
    + [f"model_attentions_{i}" for i in range(4)]
    + [f"backbone_feature_maps_{i}" for i in range(3)]
    # the family's tiny models (cuda_sim_checks.family_configs): one stage per isotropic model
    + [f"family_{name}_{check}" for name in ("dinat_s", "nat_isotropic", "vitrpb")
       for check in ("logits", "hidden_states_count", "attentions_count", "hidden_states_0", "hidden_states_1",
                     "attentions_0")]
    + ["family_dinat_s_hidden_states_2", "family_dinat_s_hidden_states_3", "family_dinat_s_attentions_1",
       "family_dinat_s_attentions_2"]
)


def _child_env(simulate: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulate:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _run_checks(part: str, simulate: bool) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, str(HELPER), part], cwd=ROOT, env=_child_env(simulate),
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, f"{HELPER.name} {part} failed:\n{completed.stderr[-4000:]}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _gpu_present() -> bool:
    if not HAVE_NUMBA_CUDA:
        return False
    probe = "from numba import cuda; print(int(cuda.is_available()))"
    completed = subprocess.run([sys.executable, "-c", probe], env=_child_env(False), capture_output=True,
                               text=True, timeout=300)
    return completed.stdout.strip().endswith("1")


def _gpu_backend_problem() -> str | None:
    """None when the CUDA backend runs on this machine's GPU, else why not (get_backend's own message)."""
    probe = (
        "from dinat_np.kernels import get_backend\n"
        "try:\n"
        "    get_backend('cuda')\n"
        "    print('ok')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=_child_env(False),
                               capture_output=True, text=True, timeout=300)
    lines = completed.stdout.strip().splitlines() or [completed.stderr.strip()[-500:]]
    return None if lines[-1] == "ok" else lines[-1]


# The simulator runs each group of checks as Python in a child process: minutes.
@pytest.fixture(scope="module", params=[pytest.param("simulator", marks=pytest.mark.slow),
                                        pytest.param("gpu", marks=pytest.mark.gpu)])
def mode(request) -> str:
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed (pip install numba-cuda)")
    if request.param == "gpu":
        if not _gpu_present():
            pytest.skip("no CUDA GPU on this machine: the simulator run covers the kernels")
        problem = _gpu_backend_problem()
        if problem is not None:
            pytest.skip(f"a GPU is present but the CUDA backend cannot use it: {problem}")
    return request.param


_cache: dict[tuple[str, str], dict[str, float]] = {}


def _results(part: str, mode: str) -> dict[str, float]:
    if (part, mode) not in _cache:
        _cache[(part, mode)] = _run_checks(part, simulate=mode == "simulator")
    return _cache[(part, mode)]


@pytest.mark.parametrize("check", KERNEL_CHECKS)
def test_kernel_matches_cpu(mode: str, check: str) -> None:
    results = _results("kernels", mode)
    assert check in results, f"{check} was not run; ran {sorted(results)}"
    assert results[check] <= ATOL, f"{check}: max abs error {results[check]:.3g}"


def test_every_kernel_check_is_asserted(mode: str) -> None:
    results = _results("kernels", mode)
    # only where CuPy is in use on a real GPU
    optional = {"cupy_gemm_gelu", "cupy_pool_view_outlives_array", "cupy_pool_array_types"}
    assert sorted(set(results) - optional) == sorted(KERNEL_CHECKS)
    assert all(results[name] <= ATOL for name in optional & set(results)), results


@pytest.mark.parametrize("check", MODEL_CHECKS)
def test_whole_model_matches_cpu(mode: str, check: str) -> None:
    results = _results("model", mode)
    assert check in results, f"{check} was not run; ran {sorted(results)}"
    assert results[check] <= ATOL, f"{check}: max abs error {results[check]:.3g}"


def test_every_model_check_is_asserted(mode: str) -> None:
    assert sorted(_results("model", mode)) == sorted(MODEL_CHECKS)


def _run_python(script: str) -> str:
    """Standard output of ``script`` in a child Python without the simulator; it must exit 0."""
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_child_env(False),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@needs_numba_cuda
def test_cuda_without_gpu_is_a_clear_error() -> None:
    if _gpu_present():
        pytest.skip("this machine has a CUDA GPU")
    script = (
        "from dinat_np import DinatConfig, DinatForImageClassification\n"
        "try:\n"
        "    config = DinatConfig(embed_dim=8, depths=[1] * 4, num_heads=[1] * 4, dilations=[[1]] * 4)\n"
        "    DinatForImageClassification(config, device='cuda')\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    stdout = _run_python(script)
    assert "RuntimeError: device='cuda' needs an NVIDIA GPU" in stdout
    assert "device='cpu'" in stdout


def test_cuda_without_numba_cuda_is_a_clear_error() -> None:
    # numba-cuda hidden from the import system: the backend module must refuse to load, and
    # get_backend must turn that into an error that says what to install.
    script = (
        "import sys\n"
        "sys.modules['numba_cuda'] = None\n"
        "from dinat_np.kernels import get_backend\n"
        "try:\n"
        "    get_backend('cuda')\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    stdout = _run_python(script)
    assert "RuntimeError: device='cuda' needs numba-cuda" in stdout
    assert "dinat-np[gpu]" in stdout


@needs_numba_cuda
def test_gpu_that_cannot_compile_is_a_clear_error() -> None:
    # As on a machine whose numpy was newer than its numba supported: the driver sees a GPU, the first
    # kernel fails. The error must carry the cause and name both usual fixes.
    script = (
        "from dinat_np.kernels.cuda import device\n"
        "def broken(*args, **kwargs):\n"
        "    raise AttributeError(\"module 'numpy' has no attribute 'row_stack'\")\n"
        "device.cuda.current_context = lambda: None\n"
        "device.cuda.to_device = broken\n"
        "try:\n"
        "    device.require_gpu()\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    stdout = _run_python(script)
    assert "RuntimeError: device='cuda': a GPU was found but numba-cuda could not compile or run" in stdout
    assert "row_stack" in stdout and "numba-cuda[cu12]" in stdout and "does not support numpy" in stdout


def _can_compile_ptx() -> bool:
    if not HAVE_NUMBA_CUDA:
        return False
    probe = (
        "from numba import cuda, float32\n"
        "def kernel(a):\n"
        "    a[0] = 1.0\n"
        "cuda.compile_ptx(kernel, (float32[::1],), cc=(7, 5))\n"
        "print('ok')\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], env=_child_env(False), capture_output=True,
                               text=True, timeout=300)
    return completed.stdout.strip().endswith("ok")


def test_kernels_compile_to_ptx() -> None:
    # The simulator runs kernels as Python, so it accepts code the CUDA compiler rejects (e.g. a shared
    # array shape that is not a constant). Where the toolkit's NVVM/NVRTC are installed
    # (numba-cuda[cu12]), compile every kernel for sm_75 and sm_90 without needing a GPU.
    if not _can_compile_ptx():
        pytest.skip("numba-cuda cannot compile PTX here (needs NVVM and NVRTC: pip install 'numba-cuda[cu12]')")
    results = _run_checks("ptx", simulate=False)
    assert results.pop("ptx_every_kernel_listed") == 0.0
    assert len(results) > 50
    bad = {name: value for name, value in results.items() if value != 0.0}
    assert not bad, f"float64 instructions or shared memory over 48 KiB: {bad}"


@needs_numba_cuda
def test_low_occupancy_warnings_are_silenced() -> None:
    # numba-cuda warns at every launch of fewer blocks than the GPU has SMs (normal for late stages at
    # batch 1), and may wrap the message in terminal colour codes.
    script = (
        "import warnings\n"
        "from numba.core.errors import NumbaPerformanceWarning\n"
        "import dinat_np.kernels.cuda\n"
        "low = 'Grid size 4 will likely result in GPU under-utilization due to low occupancy.'\n"
        "for message in (low, '\\x1b[1m' + low + '\\x1b[0m', 'Host array used in a CUDA kernel.'):\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.warn(NumbaPerformanceWarning(message))\n"
        "    print(len(caught))\n"
    )
    assert _run_python(script).split() == ["0", "0", "1"]  # other performance warnings still reach users
