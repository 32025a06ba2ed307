"""Classify a folder of images with PySpark: ``mapInPandas`` over a DataFrame of image paths.

    python examples/spark_classify.py IMAGES [--master local[2]] [--workers 2] [--threads-per-worker 1]

- The classifier is loaded once, here (the weights cache is filled once, the kernels compiled once),
  and broadcast: each Python worker process unpickles it once and keeps it for every partition it
  classifies (Spark reuses its Python workers).
- Each task reserves ``--threads-per-worker`` cores (``spark.task.cpus``), and the Python workers start
  with that many kernel threads and the shared NUMBA_CACHE_DIR (the driver's environment in local
  mode, ``spark.executorEnv.*`` on a cluster).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import scale_out_common as common  # first: it sets NUMBA_CACHE_DIR before Numba loads

import pandas as pd
from pyspark.sql import SparkSession

SCHEMA = "path string, label string, score double, error string"


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--master", default=None, help="Spark master (default: local[WORKERS x THREADS])")
    args = parser.parse_args()
    paths = common.image_paths(args.images)
    started = time.perf_counter()
    classifier = common.load_once(args.model, args.batch_size, paths)
    environment = common.worker_environment(args.threads_per_worker)
    os.environ.update(environment)  # local mode: the Python workers inherit the driver's environment
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers run this Python, which has dinat-np
    builder = SparkSession.builder.appName("dinat-np").master(
        args.master or f"local[{args.workers * args.threads_per_worker}]")
    builder = builder.config("spark.task.cpus", str(args.threads_per_worker))
    for name, value in environment.items():
        builder = builder.config(f"spark.executorEnv.{name}", value)
    spark = builder.getOrCreate()
    shared = spark.sparkContext.broadcast(classifier)

    def classify(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """On a worker: each partition's rows, top-1 label and score (or the error) per image."""
        for frame in frames:
            rows = []
            for result in shared.value.iter_predict(list(frame["path"]), top_k=1):
                best = result.predictions[0] if result.ok else None
                rows.append({"path": str(result.source), "label": best and best.label,
                             "score": best and best.score, "error": None if result.ok else result.error.reason})
            yield pd.DataFrame(rows, columns=["path", "label", "score", "error"])

    frame = spark.createDataFrame([(path,) for path in paths], "path string").repartition(
        max(1, len(paths) // (4 * args.batch_size)))
    rows = frame.mapInPandas(classify, SCHEMA).collect()
    spark.stop()
    records = [{"path": row.path, "error": row.error} if row.error else
               {"path": row.path, "predictions": [{"rank": 1, "label": row.label, "score": row.score}]}
               for row in rows]
    common.report(records, started, args.output)


if __name__ == "__main__":
    main()
