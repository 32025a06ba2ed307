"""What the Dask, Ray and Spark examples share on the driver: options, the worker environment, the
warm-up, the report (the workers themselves need nothing but dinat-np).

Import this module first: it points Numba's cache of compiled kernels at one shared folder before
Numba loads, so that the kernels compiled once (here, by the warm-up) are loaded by every worker
instead of compiled again by each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

# Workers on other machines need this folder on a shared file system (and dinat-np installed at the
# same path, which Numba's cache index records).
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "dinat-np" / "numba"))

from dinat_np import ImageClassifier  # noqa: E402 - after NUMBA_CACHE_DIR, which Numba reads when it loads
from dinat_np.image_loading import IMAGE_EXTENSIONS  # noqa: E402

THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("images", type=Path, help="a folder of images (see examples/digit_images.py)")
    parser.add_argument("--model", default="digits-demo", help="registry name, Hub repo id or folder")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="threads each worker's kernels use (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--output", type=Path, default=None, help="write one JSON line per image here")
    return parser


def image_paths(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def worker_environment(threads: int) -> dict[str, str]:
    """Set in each worker process before it starts: its threads, and the shared kernel cache."""
    return {**{name: str(threads) for name in THREAD_VARIABLES}, "NUMBA_CACHE_DIR": os.environ["NUMBA_CACHE_DIR"]}


def load_once(model: str, batch_size: int, paths: list[str]) -> ImageClassifier:
    """The classifier, loaded here: this fills the weights cache once (a download and conversion on
    first use), and one prediction compiles the kernels once, into the shared NUMBA_CACHE_DIR."""
    classifier = ImageClassifier.from_pretrained(model, batch_size=batch_size)
    classifier.predict(paths[:1])
    return classifier


def report(records: Iterable[dict[str, Any]], started: float, output: Path | None) -> None:
    """Write the records (``ClassificationResult.to_dict``: ``{"path", "predictions"}`` or ``{"path",
    "error"}``) and a summary on stderr; files named ``..._<digit>.png`` also give the accuracy."""
    records = list(records)
    elapsed = time.perf_counter() - started
    lines = "".join(json.dumps(record) + "\n" for record in records)
    if output is not None:
        output.write_text(lines)
    else:
        sys.stdout.write(lines)
    classified = [r for r in records if "predictions" in r]
    truth = {r["path"]: Path(r["path"]).stem.rsplit("_", 1)[-1] for r in classified}
    scored = [r for r in classified if truth[r["path"]].isdigit()]
    right = sum(r["predictions"][0]["label"] == truth[r["path"]] for r in scored)
    accuracy = f", accuracy {right}/{len(scored)}" if scored else ""
    print(f"{len(records)} images, {len(records) - len(classified)} failed{accuracy}, {elapsed:.1f} s",
          file=sys.stderr)
