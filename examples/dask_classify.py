"""Classify a folder of images on a Dask cluster: a bag of image paths, one classifier per worker process.

    python examples/dask_classify.py IMAGES [--scheduler tcp://HOST:8786] [--workers 2] [--threads-per-worker 1]

Without ``--scheduler`` a LocalCluster of ``--workers`` processes is started here. With one, start the
workers with one task at a time and the environment ``worker_environment`` gives, e.g.
``NUMBA_NUM_THREADS=4 OMP_NUM_THREADS=4 NUMBA_CACHE_DIR=/shared/numba dask worker tcp://HOST:8786 --nthreads 1``;
they must see the image files and the shared NUMBA_CACHE_DIR.

- The classifier is loaded once, here (the weights cache is filled once, the kernels are compiled once),
  and sent to each worker once: ``client.scatter(classifier, broadcast=True)``; the tasks then share the
  worker's copy.
- A worker runs one task at a time (``threads_per_worker=1``): its kernels use ``--threads-per-worker``
  threads, from the environment its process starts with.
"""

from __future__ import annotations

import time

import scale_out_common as common  # first: it sets NUMBA_CACHE_DIR before Numba loads

import dask.bag as db
from distributed import Client, LocalCluster


def classify_partition(paths: list[str], classifier) -> list[dict]:
    """On a worker: the records of one partition (a few whole batches)."""
    return [result.to_dict() for result in classifier.iter_predict(paths, top_k=1)]


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    args = parser.parse_args()
    paths = common.image_paths(args.images)
    started = time.perf_counter()
    classifier = common.load_once(args.model, args.batch_size, paths)
    cluster = None if args.scheduler else LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
        env=common.worker_environment(args.threads_per_worker))
    with Client(args.scheduler or cluster) as client:
        shared = client.scatter(classifier, broadcast=True)
        bag = db.from_sequence(paths, partition_size=4 * args.batch_size)
        records = bag.map_partitions(classify_partition, shared).compute()
    if cluster is not None:
        cluster.close()
    common.report(records, started, args.output)


if __name__ == "__main__":
    main()
