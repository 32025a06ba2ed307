"""GPU benchmark of dinat-np's CUDA backend against PyTorch on the same GPU (issue 6). Run by hand, not in CI.

    python -m benchmarks.bench_cuda [--batch-sizes 1 32] [--repeats 20] [--warmup 3] [--json results.json]

(from the repository root, so that the PyTorch reference imports as ``tests.reference.torch_natten``)

Needs a CUDA GPU, ``numba-cuda`` (``pip install 'dinat-np[gpu]'``) and, for the baseline, a CUDA build of
torch plus ``transformers==4.53.3``. One run measures dinat-mini (HF's default ``DinatConfig``: embed_dim
64, depths 3-4-6-5, kernel 7) at 224x224 with 1000 classes and random weights (seed 0, every tensor
perturbed so that biases and rpb are not zero):

* PyTorch eager: transformers' own ``DinatForImageClassification`` on the GPU, float32 throughout (TF32
  off for matmuls and cuDNN convolutions unless ``--allow-tf32``), ``torch.inference_mode``. Neighborhood
  attention comes from NATTEN when NATTEN with its legacy ``natten2dqkrpb``/``natten2dav`` ops is
  importable, otherwise from the test-suite reference ``tests/reference/torch_natten.py`` (plain PyTorch gathers
  and einsums); the run records which;
* dinat-np: the same weights saved by ``save_pretrained`` and loaded with
  ``DinatForImageClassification.from_pretrained(folder, device="cuda")``.

Both are timed the way a user calls them: NumPy pixels in, NumPy logits out (host-to-device copy of the
input and device-to-host copy of the logits included; the latter also synchronises). Reported: median,
min and mean milliseconds per forward over ``--repeats`` timed calls after ``--warmup`` calls (the first
dinat-np call also compiles its kernels: that time is reported separately), images per second, and the
largest logit difference between the two. The device name and library versions are recorded.

``--device cpu`` runs the same script on the CPU (PyTorch CPU vs dinat-np's CPU backend) as a smoke test
of the script itself; its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SIZE = 224
NUM_LABELS = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per measurement (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default 3)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the benchmark) or cpu (a smoke test of this script)")
    parser.add_argument("--allow-tf32", action="store_true",
                        help="leave PyTorch's TF32 defaults (cuDNN convolutions in TF32) instead of strict float32")
    parser.add_argument("--skip-torch", action="store_true", help="time dinat-np only")
    parser.add_argument("--profile", action="store_true",
                        help="also time dinat-np's ops one by one for one forward: synchronising around each "
                             "(device + host time), and on the GPU once more without (host time alone)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("numpy", "numba", "numba_cuda", "cupy", "torch", "transformers", "natten"):
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # not installed, or fails to import on this machine
            found[name] = None
    return found


def natten_has_legacy_ops() -> bool:
    """Whether NATTEN is importable with the ops transformers 4.53.3's DiNAT calls (removed in NATTEN 0.20)."""
    if importlib.util.find_spec("natten") is None:
        return False
    try:
        functional = importlib.import_module("natten.functional")
    except Exception:
        return False
    return hasattr(functional, "natten2dqkrpb") and hasattr(functional, "natten2dav")


def build_torch_model(device: str) -> tuple[Any, str]:
    """transformers' DiNAT (dinat-mini, 1000 classes), random weights, on ``device``; and the attention used."""
    import torch

    if natten_has_legacy_ops():
        attention = "NATTEN"
    else:
        from tests.reference.torch_natten import patch_transformers

        patch_transformers()  # for the rest of this process
        attention = "tests/reference/torch_natten.py reference (NATTEN not importable)"
    from transformers import DinatConfig, DinatForImageClassification

    torch.manual_seed(0)
    config = DinatConfig(num_labels=NUM_LABELS)  # HF's defaults are the dinat-mini architecture
    model = DinatForImageClassification(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # zero biases / rpb would hide indexing mistakes
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.to(device), attention


def timed(call: Callable[[], np.ndarray], warmup: int, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    logits = call()
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(max(0, warmup - 1)):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = call()  # returns host NumPy: the device work is finished when it returns
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "first_call_ms": first_ms,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "logits": logits,
    }


PROFILED_OPS = (
    "nchw_to_nhwc", "conv3x3_stride2", "layer_norm", "linear", "linear_residual", "mlp_residual",
    "neighborhood_attention", "pad_bottom_right", "crop", "mean_pool", "upload", "download",
)


def profile_ops(
    backend: Any, model: Any, pixels: np.ndarray, synchronise: Callable[[], None]
) -> dict[str, dict[str, float]]:
    """Milliseconds per op of ``backend`` over one forward of ``model``, each op timed between two calls of
    ``synchronise``.

    With the device's synchronisation the times are the ops' whole cost; with a no-op they are what the
    host spends launching them (kernels run asynchronously), unless an op waits for the GPU itself.
    """
    totals: dict[str, dict[str, float]] = {}
    originals = {name: getattr(backend, name) for name in PROFILED_OPS}

    def timer(name: str, op: Callable[..., Any]) -> Callable[..., Any]:
        def timed_op(*args: Any, **kwargs: Any) -> Any:
            synchronise()
            start = time.perf_counter()
            result = op(*args, **kwargs)
            synchronise()
            entry = totals.setdefault(name, {"calls": 0, "ms": 0.0})
            entry["calls"] += 1
            entry["ms"] += (time.perf_counter() - start) * 1e3
            return result
        return timed_op

    try:  # the model calls its ops through the backend object, so replacing its attributes reaches every call
        for name, op in originals.items():
            setattr(backend, name, timer(name, op))
        model(pixels)
    finally:
        for name, op in originals.items():
            setattr(backend, name, op)
    return dict(sorted(totals.items(), key=lambda item: -item[1]["ms"]))


def main() -> None:
    args = parse_args()
    from dinat_np import DinatForImageClassification as NpModel
    from dinat_np.kernels import get_backend

    report: dict[str, Any] = {"versions": versions(), "image_size": args.image_size, "model": "dinat-mini",
                              "device": args.device, "results": []}

    torch_model = attention = None
    if not args.skip_torch:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("PyTorch sees no CUDA GPU: install a CUDA build of torch, or pass --skip-torch")
        if not args.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch_model, attention = build_torch_model(args.device)
        report["torch_attention"] = attention
        report["tf32"] = bool(args.allow_tf32)
        if args.device == "cuda":
            report["torch_device_name"] = torch.cuda.get_device_name()

    with tempfile.TemporaryDirectory() as folder:
        if torch_model is not None:
            torch_model.save_pretrained(folder, safe_serialization=True)
        else:  # dinat-np alone: random weights of its own
            from dinat_np import DinatConfig

            NpModel(DinatConfig(num_labels=NUM_LABELS), seed=0).save_pretrained(folder)
        start = time.perf_counter()
        np_model = NpModel.from_pretrained(folder, device=args.device)
        report["dinat_np_load_s"] = time.perf_counter() - start

    synchronise: Callable[[], None] = lambda: None  # noqa: E731  (the CPU backend returns finished arrays)
    if args.device == "cuda":
        from numba import cuda

        from dinat_np.kernels.cuda import products

        name = cuda.get_current_device().name
        report["numba_device_name"] = name.decode() if isinstance(name, bytes) else str(name)
        report["dinat_np_matmul"] = "cuBLAS via CuPy" if products._external_gemm is not None else "numba tiled kernel"
        synchronise = cuda.synchronize

    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        pixels = rng.normal(size=(batch, 3, args.image_size, args.image_size)).astype(np.float32)
        row: dict[str, Any] = {"batch": batch}
        ours = timed(lambda pixels=pixels: np_model(pixels).logits, args.warmup, args.repeats)
        row["dinat_np"] = {k: v for k, v in ours.items() if k != "logits"}
        row["dinat_np"]["images_per_s"] = batch / ours["median_ms"] * 1e3
        if torch_model is not None:
            import torch

            def torch_forward(pixels: np.ndarray = pixels) -> np.ndarray:
                with torch.inference_mode():
                    inputs = torch.from_numpy(pixels).to(args.device)
                    return torch_model(pixel_values=inputs).logits.float().cpu().numpy()

            theirs = timed(torch_forward, args.warmup, args.repeats)
            row["torch"] = {k: v for k, v in theirs.items() if k != "logits"}
            row["torch"]["images_per_s"] = batch / theirs["median_ms"] * 1e3
            row["max_abs_logit_difference"] = float(np.max(np.abs(ours["logits"] - theirs["logits"])))
            row["speedup_vs_torch"] = theirs["median_ms"] / ours["median_ms"]
        if args.profile:
            backend = get_backend(args.device)
            row["dinat_np_ops"] = profile_ops(backend, np_model, pixels, synchronise)
            if args.device == "cuda":
                row["dinat_np_ops_host"] = profile_ops(backend, np_model, pixels, lambda: None)
        report["results"].append(row)
        print(json.dumps(row), flush=True)

    print()
    print(f"device: {report.get('torch_device_name') or report.get('numba_device_name') or args.device}; "
          f"attention in PyTorch: {report.get('torch_attention')}; dinat-np products: "
          f"{report.get('dinat_np_matmul', 'n/a')}")
    print("| batch | dinat-np ms (median) | PyTorch ms (median) | dinat-np / PyTorch speed | max logit difference |")
    print("|---|---|---|---|---|")
    for row in report["results"]:
        cells = [str(row["batch"]), f"{row['dinat_np']['median_ms']:.2f}", "-", "-", "-"]
        if "torch" in row:
            cells[2:] = [f"{row['torch']['median_ms']:.2f}", f"{row['speedup_vs_torch']:.2f}x",
                         f"{row['max_abs_logit_difference']:.2e}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
