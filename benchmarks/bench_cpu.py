"""CPU benchmark of dinat-np against its BLAS floor, PyTorch and its peers (issues 5, 24). Run by hand, not in CI.

    python -m benchmarks.bench_cpu [--model mini|tiny|small|base] [--threads N] [--repeats 20]
                                   [--target host|avx2|generic] [--skip-busy] [--skip-torch] [--skip-peers]
                                   [--skip-startup] [--busy-only] [--json results.json]

One run measures, at 224x224 with random weights (seed 0) and 1000 classes:

* batch 1 latency (median of >= 20 timed forwards after warm-up) and batch 8 throughput;
* batch 1 latency beside one competing busy process (a bounded busy-loop child: one core's worth of other
  work), against the idle latency, in alternating idle and busy blocks so that drift cancels; each block
  times the thread count adapting to other processes and fixed, in alternation (``--busy-only``: this alone);
* the BLAS floor: the model's own matrix products (q/k/v, attention output, MLP in/out, classifier,
  and the 3x3 stride-2 convolutions as their im2col products), shapes recorded from a real forward,
  replayed with NumPy on random data, each with its own weight as in the model (and, for comparison,
  with one weight per shape, which stays in cache), timed in alternation with the engine's forwards so
  that the ratio holds while the machine's speed drifts; the model's GFLOP;
* PyTorch eager (transformers' own DiNAT modeling code, the test-suite reference attention of
  ``tests/reference/torch_natten.py``, the same weights and input, ``torch.set_num_threads`` matching) when
  torch and transformers are installed; run in a subprocess so its thread pools never compete with ours;
* peers, batch 1: ONNX Runtime and OpenVINO, where installed, on the same model exported to ONNX from
  transformers with that gather-based attention; the export and each runtime in a subprocess of its own;
* a per-op breakdown of the engine, taken by wrapping the functions of the CPU backend
  (``dinat_np.kernels.cpu`` and its modules) with timers at run time (the library is not changed),
  achieved GFLOP/s, peak RSS (this process, and a
  separate batch-1-only process);
* start-up: the first forward in a process whose Numba cache is empty (``NUMBA_CACHE_DIR`` = a new
  temporary folder), and a fresh ``dinat-classify IMAGE`` process with the cache warm;
* that a new input size or batch size adds no compiled signature to any kernel (no recompilation).

``--threads N`` sets the BLAS thread variables before NumPy is imported, and Numba's thread count (fixed
then: it no longer adapts to other processes); without it every library keeps its own default.
``--target avx2`` or ``generic`` runs everything above as on another CPU: the whole benchmark runs again in a
child process whose environment, read by Numba and OpenBLAS as they start, names that CPU (``avx2``: LLVM's
``haswell`` with exactly its features, no AVX-512, and OpenBLAS's Haswell kernels for the floor; ``generic``:
baseline x86-64 code and OpenBLAS's Prescott kernels), with a Numba cache of its own for the run, so that code
compiled for different CPUs never mixes. The peers pick their kernels for the host CPU whatever the target.
Numbers are only comparable on an otherwise idle machine: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REPORTED_VARIABLES = (
    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT",
    "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER", "NUMBA_CACHE_DIR", "NUMBA_CPU_NAME",
)
IMAGE_SIZE = 224
NUM_LABELS = 1000

# The architectures come from the registry (weights/registry.json): the published in1k checkpoints.
MODELS = ("mini", "tiny", "small", "base")

# The CPUs the engine can be measured as (--target). LLVM's names of what its `haswell` has: the first
# cores with AVX2 and FMA, the instruction set of most laptops (and no AVX-512).
TARGETS = ("host", "avx2", "generic")
HASWELL_FEATURES = (
    "64bit", "cmov", "cx8", "cx16", "fxsr", "mmx", "sahf", "sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2",
    "popcnt", "crc32", "pclmul", "avx", "xsave", "xsaveopt", "f16c", "fsgsbase", "rdrnd", "avx2", "bmi", "bmi2",
    "fma", "invpcid", "lzcnt", "movbe",
)
TARGET_VARIABLES = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "OPENBLAS_CORETYPE", "NUMBA_CACHE_DIR")

# The busy-core case: a pure-Python loop that stops by itself at a deadline (and is killed after its block).
BUSY_LOOP = """
import sys
import time
deadline = time.monotonic() + float(sys.argv[1])
print("ready", flush=True)
while time.monotonic() < deadline:
    pass
"""
BUSY_BLOCK = 5  # timed batch-1 forwards per idle or busy block (after one untimed, the first after a switch)

PEER_RUNTIMES = ("onnxruntime", "openvino")


# Targets of issue 5 on the 2-core development machine.
TARGET_BATCH1_FLOOR_RATIO = 1.5
TARGET_BATCH8_FLOOR_RATIO = 1.25
TARGET_CLASSIFY_WALL_S = 1.5
TARGET_COLD_COMPILE_S = 25.0
TARGET_COLD_CLASSIFY_S = 15.0  # issue 24: the whole first classification with an empty Numba cache
TARGET_RSS_BATCH1_MIB = 350.0
# Targets of issue 24: batch 1 beside one busy process, against idle; batch 1 and batch 8 against the floor
# by the vectors the engine compiled for (AVX-512 on Intel and AMD; AVX2 without it; none for generic x86-64).
TARGET_BUSY_RATIO = 2.2
TARGET_FLOOR_RATIOS = {"AVX-512": (1.1, 1.15), "AVX2": (1.2, 1.2)}

# Functions of the CPU backend wrapped with timers for the per-op breakdown. The public ops are what the
# model calls (through the package, ``dinat_np.kernels.cpu``); the private kernels are what those ops call
# by global name in their own modules (``dinat_np.kernels.cpu.<module>``, one of OP_MODULES). A function
# is replaced wherever the package or one of those modules binds it (conv3x3_stride2 calls ``linear``
# through conv's globals), so that every call is timed.
OP_MODULES = ("attention", "conv", "layout", "norm", "products")
PUBLIC_OPS = (
    "neighborhood_attention", "layer_norm", "linear", "linear_residual", "mlp_residual", "conv3x3_stride2",
    "pad_bottom_right", "crop", "mean_pool", "nchw_to_nhwc",
)
PRIVATE_KERNELS = (
    "_na_fused", "_na_whole_groups", "_layer_norm", "_linear", "_mlp", "_im2col_3x3_s2", "_conv3x3_s2",
)
# Ops that run a matrix product and its epilogue (one ``_linear`` kernel); their inputs give its shape.
LINEAR_OPS = ("linear", "linear_residual")
# Ops that run an MLP's two products with their epilogues (one ``_mlp`` kernel, or two ``_linear`` ones).
MLP_OPS = ("mlp_residual",)
# The modules whose compiled functions the recompilation check counts: the ops' and those they call.
KERNEL_MODULES = OP_MODULES + ("gemm", "simd")
CATEGORIES = ("attention", "layernorm", "products", "convolutions", "rest")
CATEGORY_LABELS = {
    "attention": "attention (fused NA kernel)",
    "layernorm": "layernorm (on its own)",
    "products": "products + epilogues (bias/GELU, residual, LayerNorm)",
    "convolutions": "convolutions (direct, or im2col+product)",
    "rest": "rest (layout, pad/crop, pool, Python)",
}


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="mini", help="DiNAT size (default: mini)")
    parser.add_argument("--threads", type=int, default=None,
                        help="Numba and BLAS threads (default: the CPUs this process may use)")
    parser.add_argument("--threading-layer", choices=("default", "omp", "workqueue", "tbb"), default="default",
                        help="Numba threading layer, set as NUMBA_THREADING_LAYER before Numba loads "
                             "(default: dinat-np's own choice, see dinat_np/kernels/cpu/threads.py, or "
                             "the variable as already set; 'omp' given here keeps libgomp's default spin "
                             "unless GOMP_SPINCOUNT is set)")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 forwards (>= 20; default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batch-1 forwards first (default 3)")
    parser.add_argument("--batch-repeats", type=int, default=8, help="timed batch-8 forwards (default 8)")
    # The first batch-8 forwards of a process run 15-40% slower while the allocator settles (fresh pages
    # for the large activations); the throughput figure is the steady state.
    parser.add_argument("--batch-warmup", type=int, default=4, help="untimed batch-8 forwards first (default 4)")
    parser.add_argument("--profile-repeats", type=int, default=5,
                        help="instrumented forwards for the per-op breakdown (default 5 at batch 1, 2 at batch 8)")
    parser.add_argument("--torch-repeats", type=int, default=10,
                        help="timed batch-1 forwards of PyTorch and of each peer (default 10)")
    parser.add_argument("--target", choices=TARGETS, default="host",
                        help="measure the engine as on this CPU: host (this one, as the environment sets it up), "
                             "avx2 (a Haswell: AVX2 + FMA, no AVX-512) or generic (baseline x86-64); the "
                             "benchmark then runs in a child process set up for it, with a Numba cache of its "
                             "own (default host)")
    parser.add_argument("--skip-busy", action="store_true",
                        help=f"no batch-1 latency beside one competing busy process (measured by default in "
                             f"idle and busy blocks of {BUSY_BLOCK} forwards in alternation; issue 24's target: "
                             f"<= {TARGET_BUSY_RATIO} x idle)")
    parser.add_argument("--skip-torch", action="store_true", help="no PyTorch baseline")
    parser.add_argument("--skip-peers", action="store_true",
                        help="no ONNX Runtime / OpenVINO peers (by default timed where installed, on the model "
                             "exported to ONNX by torch + transformers)")
    parser.add_argument("--skip-startup", action="store_true", help="no cold-compile / dinat-classify runs")
    parser.add_argument("--busy-only", action="store_true",
                        help="measure only batch 1 beside one busy process (and idle), nothing else")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement in a subprocess
    parser.add_argument("--child-arg", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads_fixed = args.threads is not None
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.target == "avx2" and not args.child:
        problem = avx2_unavailable()
        if problem:
            parser.error(f"--target avx2: {problem}")
    return args


# NumPy is imported only once the thread settings are in place.
np: Any = None


def setup_threads(threads: int | None, threading_layer: str) -> None:
    """The same thread set-up as ``dinat-classify --threads`` where ``threads`` is given, before NumPy and
    Numba's pool load."""
    global np
    if threading_layer != "default":
        os.environ["NUMBA_THREADING_LAYER"] = threading_layer
    if threads is not None:
        from dinat_np.cli.classify import configure_threads

        configure_threads(threads)
    import numpy

    np = numpy


# ---------------------------------------------------------------------------------------------------------
# Target CPUs
# ---------------------------------------------------------------------------------------------------------
def host_cpu_features() -> dict[str, bool]:
    """Every feature LLVM knows for this machine's architecture, and whether this CPU has it."""
    from llvmlite import binding

    return dict(binding.get_host_cpu_features())


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def avx2_unavailable() -> str | None:
    """Why this machine cannot run code compiled for a Haswell, or None when it can."""
    if not is_x86_64():
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    features = host_cpu_features()
    missing = [name for name in HASWELL_FEATURES if name in features and not features[name]]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def target_environment(target: str) -> dict[str, str]:
    """The variables that make Numba compile, and OpenBLAS run, as on ``target``'s CPU (read as they start)."""
    if target == "avx2":
        # all of haswell's features on and every other one LLVM knows (AVX-512 among them) off
        others = sorted(set(host_cpu_features()) - set(HASWELL_FEATURES))
        features = [f"+{name}" for name in HASWELL_FEATURES] + [f"-{name}" for name in others]
        return {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ",".join(features), "OPENBLAS_CORETYPE": "Haswell"}
    if target == "generic":  # (OpenBLAS builds without the oldest cores report Prescott's kernels as "Katmai")
        return {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "",
                "OPENBLAS_CORETYPE": "Prescott" if is_x86_64() else "ARMV8"}
    return {}


def run_as_target(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The whole benchmark in a child process set up as ``args.target``'s CPU, with a Numba cache of its own
    (empty at first, kept for the run: its dinat-classify runs find it warm)."""
    with tempfile.TemporaryDirectory(prefix=f"dinat-bench-numba-{args.target}-") as cache:
        env = dict(os.environ, **target_environment(args.target), NUMBA_CACHE_DIR=cache)
        log(f"--target {args.target}: the benchmark runs in a child process compiled for that CPU, "
            f"Numba cache {cache} (the first forward compiles every kernel)")
        command = [sys.executable, "-m", "benchmarks.bench_cpu", *argv, "--child", "benchmark"]
        # progress goes to stderr as it is
        process = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"bench_cpu: the --target {args.target} run failed (exit {process.returncode})")
    return json.loads(lines[-1])


def target_summary(target: dict[str, Any]) -> str:
    """The target row of the report: what Numba compiled the engine for and which kernels the floor's OpenBLAS ran."""
    env = target["env"]
    features = [name for name in (env["NUMBA_CPU_FEATURES"] or "").split(",") if name]
    enabled = [name[1:] for name in features if name.startswith("+")]
    vectors = ", ".join(name for name in ("avx", "avx2", "fma", "avx512f") if name in enabled) or "none of avx/avx2/fma"
    if env["NUMBA_CPU_NAME"] in (None, "host"):
        compiled = "Numba compiles for this CPU" + (f", NUMBA_CPU_FEATURES {len(enabled)} on" if features else "")
    else:
        compiled = (f"NUMBA_CPU_NAME={env['NUMBA_CPU_NAME']}, NUMBA_CPU_FEATURES {len(enabled)} on "
                    f"({vectors}), {len(features) - len(enabled)} off")
    return (f"{target['name']}: {compiled}; engine's AVX-512 code: {'yes' if target['wide_vectors'] else 'no'}; "
            f"floor's OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE'] or '(unset: for this CPU)'}")


# ---------------------------------------------------------------------------------------------------------
# Model, inputs, machine
# ---------------------------------------------------------------------------------------------------------
def model_kwargs(name: str) -> dict[str, Any]:
    from dinat_np.hub import registry_entry

    architecture = registry_entry(f"dinat-{name}-in1k-224")["architecture"]
    return dict(architecture, num_labels=NUM_LABELS)


def build_model(name: str) -> Any:
    from dinat_np import DinatConfig, DinatForImageClassification

    return DinatForImageClassification(DinatConfig(**model_kwargs(name)), seed=0)


def pixels(batch: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, seed: int = 0) -> Any:
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def engine_products() -> str:
    """Where the engine's matrix products run (``dinat_np.kernels.cpu.gemm.PRODUCTS``), in words."""
    from dinat_np.kernels.cpu import products
    from dinat_np.kernels.cpu.gemm import TILE_COLUMNS

    return {"own": f"its own kernel (cpu/gemm.py; weights packed in {TILE_COLUMNS}-column panels)",
            "openblas": "NumPy's OpenBLAS, called from the kernels", "numpy": "NumPy's matmul"}[products._PRODUCTS]


def blas_info() -> str:
    """BLAS library, version and the kernel family OpenBLAS picked at run time (when it can be asked)."""
    text = "unknown"
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        text = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        pass
    try:  # threadpoolctl is a dev-only extra here (scikit-learn brings it)
        import threadpoolctl

        for pool in threadpoolctl.threadpool_info():
            if pool.get("user_api") == "blas":
                text += f" (core {pool.get('architecture')}, {pool.get('num_threads')} threads)"
                break
    except Exception:
        pass
    return text


def _proc_status_mib(field: str) -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_now_mib() -> float:
    return _proc_status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak RSS of this process image.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child started by a
    big parent would report the parent's peak. Falls back to ru_maxrss where /proc is missing.
    """
    peak = _proc_status_mib("VmHWM")
    if peak == peak:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def machine_info(threads: int) -> dict[str, Any]:
    import numba

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "blas": blas_info(),
        "products": engine_products(),
        "threads": threads,
        "numba_threads_max": numba.config.NUMBA_NUM_THREADS,
        "numba_threads": numba.get_num_threads(),
        "env": {name: os.environ.get(name) for name in REPORTED_VARIABLES},
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except Exception:
        info["torch"] = None
    # Numba imports scipy.linalg at its first use where SciPy is installed (to look for a BLAS): part of
    # every start of a classification process; SciPy is not a dependency of dinat-np
    info["scipy"] = importlib.metadata.version("scipy") if importlib.util.find_spec("scipy") else None
    return info


# ---------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------
def time_calls(function: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(first: Callable[[], Any], second: Callable[[], Any], repeats: int,
                     warmup: int) -> tuple[list[float], list[float]]:
    """Time two functions in alternation (AB, BA, AB, ...): both see the same machine state, so their
    ratio holds while this VM's speed drifts (the same floor has measured 24.5-31 ms within an hour)."""
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(repeats):
        for index in (0, 1) if repeat % 2 == 0 else (1, 0):
            function = (first, second)[index]
            start = time.perf_counter()
            function()
            times[index].append(time.perf_counter() - start)
    return times


def time_beside_busy_process(function: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """``function`` alone and beside one busy process (one core's worth of other work), in blocks of BUSY_BLOCK
    calls in the order idle, busy, busy, idle, idle, ... so that the machine's drift cancels in the ratio.

    Each busy block has its own busy-loop child, which stops by itself at a deadline well after the block
    should end (so that none outlives an interrupted run) and is killed when the block ends. Where the
    thread count may adapt to other processes (``dinat_np.kernels.cpu.sharing``: not with ``--threads``),
    each block times it adapting and fixed, in alternating order; the first call after each switch is not
    timed. Returns, per mode, the idle and busy times and their ratio, and the thread counts used.
    """
    import numba

    from dinat_np.kernels.cpu import threads

    modes = ("adapting", "fixed") if threads.adapt_thread_count(True) else ("fixed",)
    blocks = 2 * max(1, -(-repeats // BUSY_BLOCK))  # idle and busy alike
    estimate = statistics.median(time_calls(function, 3, 1))
    deadline_s = 60 + 20 * len(modes) * (BUSY_BLOCK + 1) * estimate
    times = {(mode, state): [] for mode in modes for state in ("idle", "busy")}
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)  # thread counts after each timed call
    problems = []

    def run(state: str) -> None:
        for mode in modes if len(times[(modes[0], state)]) % (2 * BUSY_BLOCK) == 0 else modes[::-1]:
            threads.adapt_thread_count(mode == "adapting")
            function()
            for _ in range(BUSY_BLOCK):
                times[(mode, state)] += time_calls(function, 1, 0)
                counts[(mode, state)][numba.get_num_threads()] += 1  # the threads running the parts

    for block in range(blocks):
        if block % 4 in (0, 3):
            run("idle")
            continue
        busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(deadline_s)], stdout=subprocess.PIPE,
                                text=True)
        try:
            busy.stdout.readline()  # its loop runs from here
            run("busy")
            if busy.poll() is not None:
                problems.append(f"block {block}: the busy loop ended before the block did (exit {busy.returncode})")
        finally:
            busy.kill()
            busy.wait()
    threads.adapt_thread_count(True)
    results: dict[str, Any] = {"blocks": blocks, "block_size": BUSY_BLOCK, "problems": problems, "modes": {}}
    for mode in modes:
        idle, loaded = summary(times[(mode, "idle")]), summary(times[(mode, "busy")])
        results["modes"][mode] = {
            "idle": idle, "busy": loaded, "ratio": loaded["median"] / idle["median"],
            "threads": {state: dict(counts[(mode, state)]) for state in ("idle", "busy")},
        }
    results.update({key: results["modes"][modes[0]][key] for key in ("idle", "busy", "ratio")})  # the default's
    if len(modes) == 2:
        results["idle_adapting_over_fixed"] = (results["modes"]["adapting"]["idle"]["median"]
                                               / results["modes"]["fixed"]["idle"]["median"])
    return results


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "p90": ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))],
        "n": len(ordered),
    }


# ---------------------------------------------------------------------------------------------------------
# Per-op instrumentation of the CPU backend
# ---------------------------------------------------------------------------------------------------------
class OpProfiler:
    """Replaces functions of the CPU backend with timing wrappers while active (a context manager): each of
    PUBLIC_OPS and PRIVATE_KERNELS wherever the package or one of its OP_MODULES binds it.

    Each call's own time (its time minus that of wrapped functions it called) is booked under
    ``(outermost wrapped op, function)``, so a product inside a convolution counts as convolution time.
    While ``recording``, the shape of every matrix product and the work of every attention call are kept.
    """

    def __init__(self) -> None:
        package = importlib.import_module("dinat_np.kernels.cpu")
        modules = [package] + [importlib.import_module(f"{package.__name__}.{name}") for name in OP_MODULES]
        self.originals: dict[str, Callable] = {}
        self.sites: list[tuple[Any, str]] = []  # (module, name): where a function is replaced
        for name in PUBLIC_OPS + PRIVATE_KERNELS:
            original = next(getattr(module, name) for module in modules if hasattr(module, name))
            self.originals[name] = original
            self.sites += [(module, name) for module in modules if getattr(module, name, None) is original]
        self.signatures = {name: inspect.signature(function) for name, function in self.originals.items()}
        self.self_time: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.recording = False
        self.products: list[tuple[int, int, int, str]] = []  # (M, K, N, context)
        self.attention_flop = 0
        self._stack: list[list[Any]] = []

    def __enter__(self) -> OpProfiler:
        wrappers = {name: self._wrap(name, function) for name, function in self.originals.items()}
        for module, name in self.sites:
            setattr(module, name, wrappers[name])
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for module, name in self.sites:
            setattr(module, name, self.originals[name])

    def reset(self, recording: bool = False) -> None:
        self.self_time.clear()
        self.calls.clear()
        self.recording = recording
        self.products = []
        self.attention_flop = 0

    def _wrap(self, name: str, function: Callable) -> Callable:
        stack, perf_counter = self._stack, time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = stack[0][0] if stack else name
            if self.recording:
                self._record(name, outer, self.signatures[name].bind(*args, **kwargs).arguments)
            stack.append([name, 0.0])
            start = perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = perf_counter() - start
                _, children = stack.pop()
                self.self_time[(outer, name)] += elapsed - children
                self.calls[(outer, name)] += 1
                if stack:
                    stack[-1][1] += elapsed

        return timed

    def _record(self, name: str, outer: str, arguments: dict[str, Any]) -> None:
        if name == "conv3x3_stride2":  # its im2col product, whichever path runs it
            batch, height, width, channels = arguments["x"].shape
            pixels = batch * ((height + 1) // 2) * ((width + 1) // 2)
            self.products.append((pixels, 9 * channels, arguments["conv"].weight.shape[1], "conv"))
        elif name in LINEAR_OPS and outer != "conv3x3_stride2":
            x, weight_t = arguments["x"], arguments["linear"].weight
            self.products.append((x.size // x.shape[-1], x.shape[-1], weight_t.shape[1], "linear"))
        elif name in MLP_OPS:
            x, fc1_t, fc2_t = arguments["x"], arguments["fc1"].weight, arguments["fc2"].weight
            rows = x.size // x.shape[-1]
            self.products += [(rows, x.shape[-1], fc1_t.shape[1], "linear"),
                              (rows, fc1_t.shape[1], fc2_t.shape[1], "linear")]
        elif name == "neighborhood_attention":
            batch, height, width, _, heads, head_dim = arguments["qkv"].shape
            kernel_size = arguments["kernel_size"]
            # q.k and attn.v: 2 * k^2 * head_dim multiply-adds each, per query and head.
            self.attention_flop += 4 * batch * height * width * heads * head_dim * kernel_size**2

    def categories(self) -> dict[str, float]:
        """Seconds per category for what was recorded since the last reset (``rest`` is set by the caller)."""
        totals = dict.fromkeys(CATEGORIES, 0.0)
        for (outer, name), seconds in self.self_time.items():
            if outer == "conv3x3_stride2":
                totals["convolutions"] += seconds
            elif name in ("neighborhood_attention", "_na_fused", "_na_whole_groups"):
                totals["attention"] += seconds
            elif name in ("layer_norm", "_layer_norm"):
                totals["layernorm"] += seconds
            elif name in LINEAR_OPS + MLP_OPS or name in ("_linear", "_mlp"):
                totals["products"] += seconds
        return totals


def profile_forwards(model: Any, profiler: OpProfiler, batch: int, runs: int) -> dict[str, Any]:
    """Median per-category seconds of ``runs`` instrumented forwards, the per-function table, and the work."""
    x = pixels(batch)
    profiler.reset(recording=True)
    model(x)  # the recorded forward: shapes and FLOPs (also a warm-up of the wrappers)
    products = list(profiler.products)
    attention_flop = profiler.attention_flop
    per_run: list[dict[str, float]] = []
    functions: dict[str, list[float]] = defaultdict(list)
    calls: Counter = Counter()
    for _ in range(runs):
        profiler.reset()
        start = time.perf_counter()
        model(x)
        total = time.perf_counter() - start
        categories = profiler.categories()
        categories["rest"] = total - sum(categories.values())
        categories["total"] = total
        per_run.append(categories)
        for key, seconds in profiler.self_time.items():
            functions["/".join(dict.fromkeys(key))].append(seconds)
        calls = Counter(profiler.calls)
    medians = {key: statistics.median(run[key] for run in per_run) for key in CATEGORIES + ("total",)}
    table = {
        name: {"seconds": statistics.median(values), "calls": calls[tuple(name.split("/"))] if "/" in name
               else calls[(name, name)]}
        for name, values in functions.items()
    }
    return {"categories": medians, "functions": table, "products": products, "attention_flop": attention_flop}


# ---------------------------------------------------------------------------------------------------------
# The BLAS floor: the model's matrix products replayed with NumPy
# ---------------------------------------------------------------------------------------------------------
def product_replay(products: list[tuple[int, int, int, str]], own_weights: bool,
                   context: str | None = None) -> Callable[[], None]:
    """The sequence of products of one forward (those of ``context`` only, if given), in order, on random
    data, with NumPy: a function that runs it once.

    With ``own_weights`` every product has its own ``(in, out)`` weight, as the model has: streaming the
    weights from memory is part of the work (about 80 MB for dinat-mini, ~5 ms at batch 1 here).
    Otherwise products of the same shape share one weight, which then stays in cache (this benchmark's
    floor before 2026-11-25: a forward that no implementation can run). Activations and outputs are one
    buffer per shape either way (a layer's input was just written by the op before it), preallocated:
    the floor is the arithmetic and the weights' traffic, not NumPy's allocator.
    """
    rng = np.random.default_rng(1)
    activations: dict[tuple[int, int], Any] = {}  # by shape: inputs and outputs
    weights: dict[tuple[int, ...], Any] = {}
    sequence = []
    for m, k, n, kind in products:
        if context is not None and kind != context:
            continue
        if (m, k) not in activations:
            activations[(m, k)] = rng.standard_normal((m, k), dtype=np.float32)
        out = activations.setdefault((m, n), np.empty((m, n), np.float32))
        weight_key = (k, n, len(sequence)) if own_weights else (k, n)
        if weight_key not in weights:
            weights[weight_key] = rng.standard_normal((k, n), dtype=np.float32) * np.float32(k**-0.5)
        sequence.append((activations[(m, k)], weights[weight_key], out))

    def run() -> None:
        for a, w, out in sequence:
            np.matmul(a, w, out=out)

    return run


def product_flop(products: list[tuple[int, int, int, str]], context: str | None = None) -> int:
    return sum(2 * m * k * n for m, k, n, c in products if context is None or c == context)


# ---------------------------------------------------------------------------------------------------------
# Recompilation check
# ---------------------------------------------------------------------------------------------------------
def kernel_signatures() -> dict[str, int]:
    """Compiled signatures of every Numba function of the CPU backend's KERNEL_MODULES, by
    ``module.function`` of its definition."""
    from numba.core.dispatcher import Dispatcher

    counts = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"dinat_np.kernels.cpu.{module_name}")
        for function in vars(module).values():
            if isinstance(function, Dispatcher):
                defined_in = function.py_func.__module__.rsplit(".", 1)[-1]
                counts[f"{defined_in}.{function.py_func.__name__}"] = len(function.signatures)
    return counts


def check_recompilation(model: Any, before: dict[str, int]) -> dict[str, Any]:
    """Run new batch sizes and input sizes (padding path and odd sizes included); count new signatures."""
    cases = [(3, 256, 320), (1, 96, 128), (2, 225, 199)]
    timings = []
    for batch, height, width in cases:
        x = pixels(batch, height, width, seed=7)
        start = time.perf_counter()
        model(x)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model(x)
        second = time.perf_counter() - start
        timings.append({"input": f"{batch}x3x{height}x{width}", "first_s": first, "second_s": second})
    after = kernel_signatures()
    added = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    return {"cases": timings, "signatures_before": before, "signatures_after": after, "added": added}


# ---------------------------------------------------------------------------------------------------------
# Subprocess measurements
# ---------------------------------------------------------------------------------------------------------
def run_child(args: argparse.Namespace, mode: str, extra_env: dict[str, str] | None = None,
              child_arg: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    # run as a module from the repository root, as the parent: the PyTorch reference imports as tests.reference
    command = [sys.executable, "-m", "benchmarks.bench_cpu", "--child", mode, "--model", args.model,
               "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--torch-repeats", str(args.torch_repeats)]
    if child_arg is not None:
        command += ["--child-arg", child_arg]
    env = dict(os.environ, **(extra_env or {}))
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - start
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        return {"error": f"exit {process.returncode}: {process.stderr.strip()[-1500:]}", "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


def child_rss_batch1(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of a process that only builds the model and runs batch 1 (cache warm)."""
    import dinat_np  # noqa: F401

    after_import = rss_now_mib()
    model = build_model(args.model)
    after_build = rss_now_mib()
    x = pixels(1)
    for _ in range(3):
        model(x)
    return {
        "after_import_mib": after_import, "after_build_mib": after_build, "after_forward_mib": rss_now_mib(),
        "peak_mib": peak_rss_mib(), "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child_cold(args: argparse.Namespace) -> dict[str, Any]:
    """First forward with an empty Numba cache (the parent sets NUMBA_CACHE_DIR to a new folder).

    NumPy and Numba are already imported here (``main``), so ``import_s`` is dinat_np's own import.
    """
    start = time.perf_counter()
    import dinat_np  # noqa: F401

    imported = time.perf_counter()
    model = build_model(args.model)
    built = time.perf_counter()
    x = pixels(1)
    model(x)
    first = time.perf_counter()
    model(x)
    second = time.perf_counter()
    cache_files = sum(1 for _ in Path(os.environ["NUMBA_CACHE_DIR"]).rglob("*.nbc"))
    return {"import_s": imported - start, "build_s": built - imported, "first_forward_s": first - built,
            "second_forward_s": second - first, "compile_s": (first - built) - (second - first),
            "signatures": kernel_signatures(), "cache_files": cache_files}


def reference_transformers() -> Any:
    """transformers, its DiNAT running the test suite's gather-based attention in place of NATTEN."""
    import transformers

    from tests.reference.torch_natten import patch_transformers  # importable: run as a module from REPO

    patch_transformers()
    return transformers


def child_torch(args: argparse.Namespace) -> dict[str, Any]:
    """PyTorch eager: transformers' DinatForImageClassification with the reference attention of the tests."""
    import torch

    torch.set_num_threads(args.threads)
    transformers = reference_transformers()
    folder = Path(args.child_arg)
    model = transformers.DinatForImageClassification.from_pretrained(folder).eval()
    data = np.load(folder / "bench_io.npz")
    one = torch.from_numpy(data["pixels1"])
    eight = torch.from_numpy(pixels(8))
    with torch.inference_mode():
        logits = model(one).logits.numpy()
        b1 = summary(time_calls(lambda: model(one), args.torch_repeats, 1))
        b8 = summary(time_calls(lambda: model(eight), 2, 1))
    return {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "batch1": b1, "batch8": b8,
        "max_abs_logit_difference": float(np.abs(logits - data["logits1"]).max()),
        "max_abs_logit": float(np.abs(data["logits1"]).max()),
    }


ONNX_FILE = "dinat.onnx"


def child_export(args: argparse.Namespace) -> dict[str, Any]:
    """transformers' DiNAT with the gather-based attention, exported to ONNX for batch 1 at 224x224 (static
    shapes: the attention's gather indices are constants for that size)."""
    import torch

    torch.set_num_threads(args.threads)
    transformers = reference_transformers()
    folder = Path(args.child_arg)
    model = transformers.DinatForImageClassification.from_pretrained(folder).eval()

    class Logits(torch.nn.Module):  # the exporters take tensors out, not transformers' output classes
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: Any) -> Any:
            return self.model(pixel_values=pixel_values).logits

    one = torch.from_numpy(np.load(folder / "bench_io.npz")["pixels1"])
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.onnx.export(Logits().eval(), (one,), str(folder / ONNX_FILE),
                                        input_names=["pixel_values"], output_names=["logits"])
    except Exception as error:  # the report says why, and the peers are skipped
        return {"error": f"torch.onnx.export raised {type(error).__name__}: {' '.join(str(error).split())[:800]}"}
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "exporter": "TorchScript" if program is None else "torch.export",
            "export_s": time.perf_counter() - start,  # the weights may be in a file of their own beside it
            "onnx_mib": sum(path.stat().st_size for path in folder.glob(ONNX_FILE + "*")) / 2**20}


def time_peer(args: argparse.Namespace, name: str, version: str, run: Callable[[Any], Any],
              prepare_s: float) -> dict[str, Any]:
    """Batch-1 latency of a peer's ``run(pixels)`` and its logits against the engine's, on the engine's input."""
    data = np.load(Path(args.child_arg) / "bench_io.npz")
    x = data["pixels1"]
    logits = np.asarray(run(x))
    return {
        "runtime": name, "version": version, "threads": args.threads, "prepare_s": prepare_s,
        "batch1": summary(time_calls(lambda: run(x), args.torch_repeats, 2)),
        "max_abs_logit_difference": float(np.abs(logits - data["logits1"]).max()),
    }


def child_onnxruntime(args: argparse.Namespace) -> dict[str, Any]:
    """ONNX Runtime's CPU provider on the exported model, ``--threads`` intra-op threads."""
    import onnxruntime

    start = time.perf_counter()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(Path(args.child_arg) / ONNX_FILE), options,
                                           providers=["CPUExecutionProvider"])
    prepare_s = time.perf_counter() - start
    return time_peer(args, "ONNX Runtime", onnxruntime.__version__,
                     lambda x: session.run(["logits"], {"pixel_values": x})[0], prepare_s)


def child_openvino(args: argparse.Namespace) -> dict[str, Any]:
    """OpenVINO's CPU plugin on the exported model: latency mode, ``--threads`` threads, float32 arithmetic
    (its default is bfloat16 on CPUs that have it, which would not compare like with like)."""
    import openvino
    import openvino.properties as properties
    import openvino.properties.hint as hints

    start = time.perf_counter()
    compiled = openvino.Core().compile_model(str(Path(args.child_arg) / ONNX_FILE), "CPU", {
        properties.inference_num_threads: args.threads,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.inference_precision: openvino.Type.f32,
    })
    request = compiled.create_infer_request()
    prepare_s = time.perf_counter() - start
    return time_peer(args, "OpenVINO", openvino.__version__.split("-")[0],
                     lambda x: request.infer({0: x})[compiled.output(0)], prepare_s)


# The fallback start-up measurement when `dinat-classify` cannot run: what it would do, by hand.
FALLBACK_CLASSIFY = """
import sys
import numpy as np
from PIL import Image
from dinat_np import DinatForImageClassification
model = DinatForImageClassification.from_pretrained(sys.argv[1])
image = Image.open(sys.argv[2]).convert("RGB").resize((224, 224), Image.BICUBIC)
x = (np.asarray(image, np.float32) / 255 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
    [0.229, 0.224, 0.225], np.float32)
logits = model(np.ascontiguousarray(x.transpose(2, 0, 1)[None])).logits[0]
top = int(np.argmax(logits))
print(sys.argv[2], top, model.config.id2label[top])
"""


def _classify_commands(args: argparse.Namespace, folder: Path, image: Path) -> list[tuple[str, list[str]]]:
    """(label, command) of a classification process: `dinat-classify` where installed, then a stand-in."""
    executable = Path(sys.executable).with_name("dinat-classify")
    found = str(executable) if executable.exists() else shutil.which("dinat-classify")
    commands = []
    if found:
        commands.append(("dinat-classify", [found, str(image), "--weights", str(folder), "--threads",
                                            str(args.threads), "--no-progress", "--top-k", "5"]))
    commands.append(("python -c (fallback: from_pretrained + PIL preprocessing + forward)",
                     [sys.executable, "-c", FALLBACK_CLASSIFY, str(folder), str(image)]))
    return commands


def _classify_environment(**extra: str) -> dict[str, str]:
    """The environment of a classification process, as a user's: with Python's bytecode cache (these VMs set
    PYTHONDONTWRITEBYTECODE, which makes every start compile dinat_np's own modules again: ~0.08 s)."""
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return {**environment, **extra}


def measure_classify(args: argparse.Namespace, folder: Path, image: Path, runs: int = 3) -> dict[str, Any]:
    """Wall time of a fresh classification process, cache warm: `dinat-classify`, else a `python -c` stand-in."""
    problems = []
    for label, command in _classify_commands(args, folder, image):
        # the first run also fills any cache, Numba's and Python's bytecode
        warm = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_classify_environment())
        if warm.returncode != 0 or not warm.stdout.strip():
            problems.append(f"{label}: exit {warm.returncode}: {warm.stderr.strip()[-600:]}")
            continue
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_classify_environment())
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                problems.append(f"{label}: exit {done.returncode} on a timed run")
        return {"measured": label, "wall": summary(times), "output": warm.stdout.strip().splitlines()[:3],
                "problems": problems}
    return {"error": "; ".join(problems)}


def measure_cold_classify(args: argparse.Namespace, folder: Path, image: Path, cache: str) -> dict[str, Any]:
    """Wall time of the first classification process with the empty Numba cache ``cache`` (issue 24)."""
    problems = []
    for label, command in _classify_commands(args, folder, image):
        start = time.perf_counter()
        cold = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env=_classify_environment(NUMBA_CACHE_DIR=cache))
        wall = time.perf_counter() - start
        if cold.returncode == 0 and cold.stdout.strip():
            return {"measured": label, "wall_s": wall, "stderr": cold.stderr.strip().splitlines()[:1]}
        problems.append(f"{label}: exit {cold.returncode}: {cold.stderr.strip()[-600:]}")
    return {"error": "; ".join(problems)}


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table (pastes into the README as is)."""
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def verdict(value: float | None, limit: float) -> str:
    if value is None or value != value:
        return "not measured"
    return "met" if value <= limit else "NOT met"


def _machine_section(results: dict[str, Any]) -> list[str]:
    info, load_start, load_end = results["machine"], results["load_start"], results["load_end"]
    env = info["env"]
    rows = [
        ["command", results["command"]],
        ["date", info["date"]],
        ["CPU", f"{info['cpu']} ({info['cores']} cores, {info['usable_cpus']} usable)"],
        ["target (--target)", target_summary(results["target"])],
        ["threads", f"{info['threads']} (numba {info['numba_threads']}, layer {results['threading_layer']})"],
        ["python / numpy / numba", f"{info['python']} / {info['numpy']} / {info['numba']}"],
        ["BLAS (the floor's products)", info["blas"]],
        ["engine's products", info["products"]],
        ["torch", str(info["torch"])],
        ["scipy (Numba imports it at first use: ~0.2 s of each start)", str(info["scipy"])],
        ["env", ", ".join(f"{k}={v}" for k, v in env.items() if v is not None) or "(none set)"],
        ["OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE",
         f"{env['OPENBLAS_CORETYPE'] or '(unset)'} / {env['OPENBLAS_L2_SIZE'] or '(unset)'}"],
        ["load average (1 min) start / end", f"{load_start[0]:.2f} / {load_end[0]:.2f}"],
    ]
    out = [f"## dinat-np CPU benchmark: dinat-{results['model']}, 224x224, random weights (seed 0)\n",
           table(rows, ["machine", ""])]
    if max(load_start[0], load_end[0]) > 0.5 * (info["usable_cpus"] or 1):
        out.append("\nWARNING: the machine was busy with other work during this run (load average above); "
                   "every timing below is only indicative.")
    return out


def _speed_section(results: dict[str, Any]) -> list[str]:
    gflop, b1, b8, floor = results["gflop"], results["batch1"], results["batch8"], results["floor"]
    out = ["\n### Work per image (224x224)\n", table([
        ["matrix products (linear layers)", f"{gflop['linear']:.3f}"],
        ["convolutions (im2col products)", f"{gflop['conv']:.3f}"],
        ["neighborhood attention (q.k + attn.v)", f"{gflop['attention']:.3f}"],
        ["total", f"{gflop['total']:.3f}"],
    ], ["GFLOP per image", ""])]
    rows = [
        ["engine batch 1 latency",
         f"median {fmt_ms(b1['median'])}, min {fmt_ms(b1['min'])}, p90 {fmt_ms(b1['p90'])} (n={b1['n']})"],
        ["engine batch 8",
         f"median {fmt_ms(b8['median'])} per batch = {8 / b8['median']:.2f} images/s, "
         f"{fmt_ms(b8['median'] / 8)} per image (n={b8['n']})"],
        ["BLAS floor batch 1 (per forward)",
         f"{fmt_ms(floor['batch1'])} (of which convolutions {fmt_ms(floor['batch1_conv'])}; one weight per shape, "
         f"cache-hot: {fmt_ms(floor['batch1_shared_weights'])})"],
        ["BLAS floor batch 8 (per image)",
         f"{fmt_ms(floor['batch8'] / 8)} (whole batch {fmt_ms(floor['batch8'])}; one weight per shape "
         f"{fmt_ms(floor['batch8_shared_weights'] / 8)} per image)"],
        ["achieved GFLOP/s (model GFLOP / time)",
         f"batch 1 {gflop['total'] / b1['median']:.1f}, batch 8 {8 * gflop['total'] / b8['median']:.1f}; "
         f"floor {gflop['products'] / floor['batch1']:.1f} (products only)"],
        ["ratio engine / floor",
         f"batch 1 {b1['median'] / floor['batch1']:.2f}x, batch 8 {b8['median'] / floor['batch8']:.2f}x "
         f"(against one weight per shape: {b1['median'] / floor['batch1_shared_weights']:.2f}x, "
         f"{b8['median'] / floor['batch8_shared_weights']:.2f}x)"],
    ]
    baseline = results.get("torch") or {}
    if "batch1" in baseline:
        t1, t8 = baseline["batch1"], baseline["batch8"]
        rows += [
            ["PyTorch eager batch 1",
             f"median {fmt_ms(t1['median'])}, min {fmt_ms(t1['min'])} (n={t1['n']}; torch {baseline['torch']}, "
             f"transformers {baseline['transformers']}, {baseline['threads']} threads)"],
            ["PyTorch eager batch 8", f"median {fmt_ms(t8['median'])} = {8 / t8['median']:.2f} images/s (n={t8['n']})"],
            ["ratio PyTorch / engine",
             f"batch 1 {t1['median'] / b1['median']:.2f}x, batch 8 {t8['median'] / b8['median']:.2f}x"],
            ["same weights and input: max |logits diff|",
             f"{baseline['max_abs_logit_difference']:.2e} (max |logit| {baseline['max_abs_logit']:.2e})"],
        ]
    else:
        rows.append(["PyTorch eager", str(baseline.get("error") or baseline.get("skipped"))])
    return out + ["\n### Latency, throughput, floor\n", table(rows, ["measurement", "value"])]


def _busy_section(results: dict[str, Any]) -> list[str]:
    busy, title = results["busy"], "\n### Batch 1 beside one busy process (one core's worth of other work)\n"
    if "ratio" not in busy:
        return [title, f"Skipped: {busy['skipped']}."]
    rows = []
    for mode, figures in busy["modes"].items():
        used = "; ".join(f"{state} " + ", ".join(f"{count}: {n}x" for count, n in sorted(calls.items()))
                         for state, calls in figures["threads"].items())
        rows.append([f"thread count {mode}", fmt_ms(figures["idle"]["median"]), fmt_ms(figures["busy"]["median"]),
                     f"{figures['ratio']:.2f}x", used])
    notes = [f"n={busy['busy']['n']} per mode and state, in {busy['blocks']} blocks of {busy['block_size']}"]
    if "idle_adapting_over_fixed" in busy:
        notes.append(f"idle adapting / fixed = {busy['idle_adapting_over_fixed']:.3f}")
    notes += busy["problems"]
    return [title, table(rows, ["mode", "idle median", "busy median", "busy / idle", "threads used (count: calls)"]),
            "\n" + "; ".join(notes) + "."]


def _peers_section(results: dict[str, Any]) -> list[str]:
    peers, b1 = results["peers"], results["batch1"]["median"]
    title = "\n### Peers, batch 1 (transformers' DiNAT exported to ONNX, gather-based attention)\n"
    if "skipped" in peers:
        return [title, f"Skipped: {peers['skipped']}."]
    export = peers["export"]
    if "error" in export:
        return [title, f"Skipped: the export to ONNX failed: {export['error']}"]
    rows = [[f"export (torch.onnx.export, {export['exporter']})",
             f"{export['export_s']:.1f} s, {export['onnx_mib']:.0f} MiB (torch {export['torch']}, "
             f"transformers {export['transformers']})"]]
    for name in PEER_RUNTIMES:
        peer = peers[name]
        if "batch1" in peer:
            t1 = peer["batch1"]
            rows.append([f"{peer['runtime']} {peer['version']}",
                         f"median {fmt_ms(t1['median'])}, min {fmt_ms(t1['min'])} (n={t1['n']}, {peer['threads']} "
                         f"threads) = {t1['median'] / b1:.2f}x the engine; prepared in {peer['prepare_s']:.1f} s; "
                         f"max |logits diff| {peer['max_abs_logit_difference']:.2e}"])
        else:
            rows.append([name, str(peer.get("error") or f"skipped: {peer.get('skipped')}")])
    return [title, table(rows, ["peer", "value"])]


def _breakdown_section(results: dict[str, Any]) -> list[str]:
    gflop, out = results["gflop"], []
    work = {"attention": gflop["attention"], "products": gflop["linear"], "convolutions": gflop["conv"]}
    for key, title, scale in (("profile1", "batch 1, per forward", 1), ("profile8", "batch 8, per image", 8)):
        profile = results[key]
        categories = profile["categories"]
        rows = []
        for category in CATEGORIES:
            seconds = categories[category] / scale
            rows.append([
                CATEGORY_LABELS[category], fmt_ms(seconds), f"{100 * categories[category] / categories['total']:.1f}%",
                f"{work[category]:.3f}" if category in work else "",
                f"{work[category] / seconds:.1f}" if category in work and seconds > 0 else "",
            ])
        rows.append(["total (instrumented)", fmt_ms(categories["total"] / scale), "100.0%", f"{gflop['total']:.3f}",
                     f"{gflop['total'] * scale / categories['total']:.1f}"])
        out.append(f"\n### Per-op breakdown, {title} (median of {profile['runs']} instrumented forwards)\n")
        out.append(table(rows, ["op", "time", "share", "GFLOP/img", "GFLOP/s"]))
    functions = sorted(results["profile1"]["functions"].items(), key=lambda item: -item[1]["seconds"])
    rows = [[name, str(entry["calls"]), fmt_ms(entry["seconds"]),
             f"{entry['seconds'] / max(entry['calls'], 1) * 1e3:.3f} ms"] for name, entry in functions]
    out.append("\n### Wrapped functions, batch 1 (own time; outer/inner when nested)\n")
    out.append(table(rows, ["function", "calls", "time", "per call"]))
    return out


def _startup_section(results: dict[str, Any]) -> list[str]:
    rss, startup, recompile = results["rss"], results.get("startup", {}), results["recompile"]
    rows = []
    if "error" in rss:
        rows.append(["peak RSS, batch-1-only process", rss["error"]])
    else:
        rows.append(["peak RSS, batch-1-only process (VmHWM)",
                     f"{rss['peak_mib']:.0f} MiB (after import {rss['after_import_mib']:.0f}, after build "
                     f"{rss['after_build_mib']:.0f}, after forwards {rss['after_forward_mib']:.0f}; getrusage "
                     f"ru_maxrss {rss['ru_maxrss_mib']:.0f}, carried over from the parent across exec)"])
    rows.append(["peak RSS, this process (batch 8 + profiling)", f"{results['peak_rss_main_mib']:.0f} MiB"])
    cold = startup.get("cold")
    if cold is None or "error" in cold:
        rows.append(["cold start (empty Numba cache)", "skipped" if cold is None else cold["error"]])
    else:
        rows.append(["cold start (empty Numba cache)",
                     f"compile ~{cold['compile_s']:.1f} s (first forward {cold['first_forward_s']:.1f} s - steady "
                     f"{cold['second_forward_s']:.2f} s); import dinat_np {cold['import_s']:.2f} s, build "
                     f"{cold['build_s']:.2f} s, whole process {cold['wall_s']:.1f} s"])
    cold_classify = startup.get("cold_classify")
    if cold_classify is None or "error" in cold_classify:
        rows.append(["first classification process, empty Numba cache",
                     "skipped" if cold_classify is None else cold_classify["error"]])
    else:
        rows.append([f"first process, empty Numba cache: {cold_classify['measured']}",
                     f"{cold_classify['wall_s']:.1f} s wall"])
    classify = startup.get("classify")
    if classify is None or "error" in classify:
        rows.append(["fresh classification process, cache warm", "skipped" if classify is None else classify["error"]])
    else:
        wall = classify["wall"]
        rows.append([f"fresh process, cache warm: {classify['measured']}",
                     f"median {wall['median']:.2f} s wall, min {wall['min']:.2f} s (n={wall['n']})"])
    rows.append(["new batch / input sizes: first / second call", "; ".join(
        f"{c['input']} {c['first_s'] * 1e3:.0f} / {c['second_s'] * 1e3:.0f} ms" for c in recompile["cases"])])
    rows.append(["kernel signatures added by them", json.dumps(recompile["added"]) if recompile["added"] else "none"])
    added8 = results["batch8_added_signatures"]
    rows.append(["signatures added by batch 8 after batch 1", json.dumps(added8) if added8 else "none"])
    return ["\n### Memory, start-up, recompilation\n", table(rows, ["measurement", "value"])]


def _targets_section(results: dict[str, Any]) -> list[str]:
    b1, b8, floor, rss = results["batch1"], results["batch8"], results["floor"], results["rss"]
    busy, startup = results["busy"], results.get("startup", {})
    cold, classify = startup.get("cold") or {}, startup.get("classify") or {}
    cold_classify = startup.get("cold_classify") or {}
    cold_stand_in = "" if cold_classify.get("measured", "dinat-classify") == "dinat-classify" else " (stand-in)"
    classify_wall = classify["wall"]["median"] if "wall" in classify else None
    measured = classify.get("measured", "dinat-classify")
    stand_in = "" if measured == "dinat-classify" else " (stand-in, not dinat-classify)"
    ratio1, ratio8 = b1["median"] / floor["batch1"], b8["median"] / floor["batch8"]
    recompiles = bool(results["recompile"]["added"] or results["batch8_added_signatures"])
    rows = [
        ["batch 1 latency <= 1.5 x floor", f"{ratio1:.2f} x", verdict(ratio1, TARGET_BATCH1_FLOOR_RATIO)],
        ["batch 8 per image <= 1.25 x floor", f"{ratio8:.2f} x", verdict(ratio8, TARGET_BATCH8_FLOOR_RATIO)],
        ["warm dinat-classify <= 1.5 s wall", f"{classify_wall:.2f} s{stand_in}" if classify_wall else "n/a",
         verdict(classify_wall, TARGET_CLASSIFY_WALL_S)],
        ["cold compile <= 25 s", f"{cold['compile_s']:.1f} s" if "compile_s" in cold else "n/a",
         verdict(cold.get("compile_s"), TARGET_COLD_COMPILE_S)],
        ["first classification, empty cache <= 15 s (issue 24)",
         f"{cold_classify['wall_s']:.1f} s{cold_stand_in}" if "wall_s" in cold_classify else "n/a",
         verdict(cold_classify.get("wall_s"), TARGET_COLD_CLASSIFY_S)],
        ["peak RSS at batch 1 <= 350 MB", f"{rss['peak_mib']:.0f} MiB" if "peak_mib" in rss else "n/a",
         verdict(rss.get("peak_mib"), TARGET_RSS_BATCH1_MIB)],
        ["new input/batch size never recompiles", "new signatures" if recompiles else "no new signatures",
         "NOT met" if recompiles else "met"],
        _busy_target_row(busy),
    ]
    vectors = _vector_set(results["target"])
    if vectors in TARGET_FLOOR_RATIOS:
        limit1, limit8 = TARGET_FLOOR_RATIOS[vectors]
        rows[2:2] = [[f"{vectors}: batch 1 <= {limit1} x floor (issue 24)", f"{ratio1:.2f} x", verdict(ratio1, limit1)],
                     [f"{vectors}: batch 8 per image <= {limit8} x floor (issue 24)", f"{ratio8:.2f} x",
                      verdict(ratio8, limit8)]]
    return ["\n### Targets of issues 5 and 24 (2-core development machine)\n",
            table(rows, ["target", "measured", "verdict"])]


def _vector_set(target: dict[str, Any]) -> str | None:
    # the vector instructions the engine was compiled with, as issue 24's targets name them
    if target["wide_vectors"]:
        return "AVX-512"
    from llvmlite import binding

    if target["name"] == "avx2" or (target["name"] == "host" and binding.get_host_cpu_features().get("avx2", False)):
        return "AVX2"
    return None


def _busy_target_row(busy: dict[str, Any]) -> list[str]:
    return ["batch 1 beside one busy process <= 2.2 x idle (issue 24)",
            f"{busy['ratio']:.2f} x" if "ratio" in busy else "n/a", verdict(busy.get("ratio"), TARGET_BUSY_RATIO)]


def _busy_target_section(results: dict[str, Any]) -> list[str]:
    return ["\n### Target of issue 24\n", table([_busy_target_row(results["busy"])], ["target", "measured", "verdict"])]


def report(results: dict[str, Any]) -> str:
    """The whole report as Markdown (``--busy-only``: the machine and the busy case)."""
    sections = (_machine_section, _speed_section, _busy_section, _peers_section, _breakdown_section,
                _startup_section, _targets_section)
    if results.get("busy_only"):
        sections = (_machine_section, _busy_section, _busy_target_section)
    return "\n".join(line for section in sections for line in section(results))


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def measure_engine(args: argparse.Namespace, results: dict[str, Any]) -> tuple[Any, Any]:
    """Everything timed inside this process; returns the batch-1 input and its logits."""
    import numba

    log(f"building dinat-{args.model} (random weights, seed 0), {args.threads} thread(s)")
    model = build_model(args.model)
    x1, x8 = pixels(1), pixels(8)
    start = time.perf_counter()
    logits1 = model(x1).logits
    log(f"first forward {time.perf_counter() - start:.2f} s (includes loading/compiling kernels)")
    results["threading_layer"] = numba.threading_layer()
    results["machine"] = machine_info(args.threads)
    if args.busy_only:
        log(f"batch 1 beside a busy process: idle and busy blocks of {BUSY_BLOCK} forwards in alternation")
        results["busy"] = time_beside_busy_process(lambda: model(x1), args.repeats)
        return x1, logits1

    signatures_b1 = kernel_signatures()
    model(x8)
    signatures_b8 = kernel_signatures()
    results["batch8_added_signatures"] = {
        name: count - signatures_b1.get(name, 0) for name, count in signatures_b8.items()
        if count != signatures_b1.get(name, 0)
    }

    log("per-op breakdown (instrumented forwards)")
    runs8 = max(2, args.profile_repeats // 2)
    with OpProfiler() as profiler:
        profile1 = profile_forwards(model, profiler, 1, args.profile_repeats)
        profile8 = profile_forwards(model, profiler, 8, runs8)
    profile1["runs"], profile8["runs"] = args.profile_repeats, runs8
    results["profile1"], results["profile8"] = profile1, profile8
    products1, products8 = profile1["products"], profile8["products"]
    gflop = {
        "linear": product_flop(products1, "linear") / 1e9,
        "conv": product_flop(products1, "conv") / 1e9,
        "products": product_flop(products1) / 1e9,
        "attention": profile1["attention_flop"] / 1e9,
    }
    gflop["total"] = gflop["products"] + gflop["attention"]
    results["gflop"] = gflop
    results["product_shapes"] = [list(p) for p in products1]

    # The engine and its floor (the model's products replayed with NumPy) in alternation.
    log(f"batch 1: {args.warmup} warm-up + {args.repeats} timed forwards, each followed or preceded by the floor")
    engine1, floor1 = time_interleaved(lambda: model(x1), product_replay(products1, True), args.repeats, args.warmup)
    log(f"batch 8: {args.batch_warmup} warm-up + {args.batch_repeats} timed forwards, likewise")
    engine8, floor8 = time_interleaved(lambda: model(x8), product_replay(products8, True), args.batch_repeats,
                                       args.batch_warmup)
    results["batch1"], results["batch8"] = summary(engine1), summary(engine8)
    log("BLAS floor variants: convolutions alone, one weight per shape")
    results["floor"] = {
        "batch1": statistics.median(floor1),
        "batch1_conv": statistics.median(time_calls(product_replay(products1, True, "conv"), 10, 1)),
        "batch1_shared_weights": statistics.median(time_calls(product_replay(products1, False), args.repeats, 2)),
        "batch8": statistics.median(floor8),
        "batch8_shared_weights": statistics.median(time_calls(product_replay(products8, False),
                                                              args.batch_repeats, 1)),
    }

    if args.skip_busy:
        results["busy"] = {"skipped": "--skip-busy"}
    else:
        log(f"batch 1 beside a busy process: idle and busy blocks of {BUSY_BLOCK} forwards in alternation")
        results["busy"] = time_beside_busy_process(lambda: model(x1), args.repeats)

    log("recompilation check: new batch and input sizes")
    results["recompile"] = check_recompilation(model, signatures_b8)
    results["peak_rss_main_mib"] = peak_rss_mib()
    return x1, logits1


def measure_outside(args: argparse.Namespace, results: dict[str, Any], x1: Any, logits1: Any) -> None:
    """Measurements in fresh processes: batch-1 RSS, PyTorch, cold compile, dinat-classify."""
    log("peak RSS of a batch-1-only process")
    results["rss"] = run_child(args, "rss1")
    with tempfile.TemporaryDirectory(prefix="dinat-bench-") as scratch:
        folder = Path(scratch) / f"dinat-{args.model}"
        build_model(args.model).save_pretrained(folder)  # seed 0: the weights timed above
        np.savez(folder / "bench_io.npz", pixels1=x1, logits1=logits1)
        if args.skip_torch:
            results["torch"] = {"skipped": "--skip-torch"}
        else:
            missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
            if missing:
                results["torch"] = {"skipped": f"not installed: {', '.join(missing)}"}
            else:
                log("PyTorch eager baseline (subprocess)")
                offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
                results["torch"] = run_child(args, "torch", offline, child_arg=str(folder))
        results["peers"] = measure_peers(args, folder)
        if args.skip_startup:
            return
        startup: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="numba-cold-") as cache:
            log("cold start: first forward with an empty Numba cache (subprocess)")
            startup["cold"] = run_child(args, "cold", {"NUMBA_CACHE_DIR": cache})
        from PIL import Image

        image_path = Path(scratch) / "image.png"
        noise = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(noise).save(image_path)
        with tempfile.TemporaryDirectory(prefix="numba-cold-") as cache:
            log("first classification process with an empty Numba cache")
            startup["cold_classify"] = measure_cold_classify(args, folder, image_path, cache)
        log("fresh classification processes, cache warm")
        startup["classify"] = measure_classify(args, folder, image_path)
        results["startup"] = startup


def measure_peers(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """ONNX Runtime and OpenVINO where installed, on the model saved in ``folder`` exported to ONNX."""
    if args.skip_peers:
        return {"skipped": "--skip-peers"}
    installed = [name for name in PEER_RUNTIMES if importlib.util.find_spec(name) is not None]
    if not installed:
        return {"skipped": f"not installed: {', '.join(PEER_RUNTIMES)}"}
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        return {"skipped": f"exporting the model to ONNX needs torch and transformers (not installed: "
                           f"{', '.join(missing)})"}
    log("peers: transformers' DiNAT exported to ONNX (subprocess)")
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    peers: dict[str, Any] = {"export": run_child(args, "export", offline, child_arg=str(folder))}
    if "error" in peers["export"]:
        log(f"peers skipped, the export to ONNX failed: {peers['export']['error']}")
        return peers
    for name in PEER_RUNTIMES:
        if name in installed:
            log(f"peers: {name} batch 1 (subprocess)")
            peers[name] = run_child(args, name, child_arg=str(folder))
        else:
            peers[name] = {"skipped": "not installed"}
    return peers


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from dinat_np.kernels.cpu import gemm

    results: dict[str, Any] = {
        "model": args.model, "load_start": os.getloadavg(),
        "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "target": {"name": args.target, "env": {name: os.environ.get(name) for name in TARGET_VARIABLES},
                   "wide_vectors": gemm.WIDE_VECTORS},
    }
    if args.repeats < 20:
        log(f"--repeats {args.repeats} < 20: below the issue's protocol (median of >= 20)")
    x1, logits1 = measure_engine(args, results)
    results["busy_only"] = args.busy_only
    if not args.busy_only:
        measure_outside(args, results, x1, logits1)
    results["load_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_threads(args.threads if args.threads_fixed else None, args.threading_layer)
    if args.child:
        handlers = {"rss1": child_rss_batch1, "cold": child_cold, "torch": child_torch, "export": child_export,
                    "onnxruntime": child_onnxruntime, "openvino": child_openvino, "benchmark": run_benchmark}
        print(json.dumps(handlers[args.child](args), default=str))
        return 0
    if args.target == "host":
        results = run_benchmark(args)
    else:
        results = run_as_target(args, argv)
        results["command"] = "python " + " ".join([Path(sys.argv[0]).name] + argv)
    print(report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
