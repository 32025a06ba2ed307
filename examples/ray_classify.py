"""Classify a folder of images with Ray Data: ``map_batches`` with a callable class, one classifier per actor.

    python examples/ray_classify.py IMAGES [--address auto] [--workers 2] [--threads-per-worker 1]

- The classifier is loaded once, here (the weights cache is filled once, the kernels compiled once),
  put in Ray's object store once (``ray.put``) and handed to each actor's constructor: an actor
  unpickles it once and classifies every batch it is given with it.
- Each actor reserves ``--threads-per-worker`` CPUs, and its process starts with that many kernel
  threads and the shared NUMBA_CACHE_DIR (``runtime_env``).
"""

from __future__ import annotations

import time

import scale_out_common as common  # first: it sets NUMBA_CACHE_DIR before Numba loads

import numpy as np
import ray


class Classify:
    """A Ray Data actor: built once per worker, then called on batches of image paths."""

    def __init__(self, shared: ray.ObjectRef) -> None:
        self.classifier = ray.get(shared)  # unpickled once per actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [result.to_dict() for result in self.classifier.iter_predict(list(batch["path"]), top_k=1)]
        return {"record": np.array(records, dtype=object)}


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="a running Ray cluster (default: start one here)")
    args = parser.parse_args()
    paths = common.image_paths(args.images)
    started = time.perf_counter()
    classifier = common.load_once(args.model, args.batch_size, paths)
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": common.worker_environment(args.threads_per_worker)})
    shared = ray.put(classifier)
    per_batch = 4 * args.batch_size  # a few whole forward passes per call
    dataset = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=-(-len(paths) // per_batch))
    classified = dataset.map_batches(Classify, fn_constructor_args=(shared,), batch_size=per_batch,
                                     concurrency=args.workers, num_cpus=args.threads_per_worker)
    records = [row["record"] for row in classified.iter_rows()]
    ray.shutdown()
    common.report(records, started, args.output)


if __name__ == "__main__":
    main()
