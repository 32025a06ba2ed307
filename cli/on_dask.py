"""The Dask face of ``dinat-classify``: a file list spread over a Dask cluster, results streamed back in order.

The classifier is loaded once, here (which fills the weights cache once), and sent to every worker
once (``scatter(broadcast=True)``, through the standard pickle): each worker process holds one copy,
however many tasks it runs. A task classifies a few whole batches of files, so that the batches, and
therefore the results, are those of a run on one machine. The workers must see the image files (a
shared file system); an image given on standard input travels as bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

BATCHES_PER_TASK = 4

# A worker may run several tasks at once (its nthreads); the kernels already use every thread the
# worker process was given, so its classifier runs one task at a time.
_one_task_at_a_time = threading.Lock()


class DaskUnavailable(Exception):
    """Dask's distributed scheduler is not installed, or the scheduler cannot be reached."""


def classify_files(classifier: Any, items: Sequence[tuple[str, Any]], top_k: int, batch_size: int,
                   threads: int | None) -> list[dict[str, Any]]:
    """On a worker: the records (``{"path", "predictions"}`` or ``{"path", "error"}``) of ``(name, source)`` items."""
    with _one_task_at_a_time:
        if threads is not None:
            from dinat_np.cli.classify import configure_threads

            configure_threads(threads)
        results = classifier.iter_predict([source for _, source in items], top_k=top_k, batch_size=batch_size)
        return [result.to_dict(path=name) for (name, _), result in zip(items, results, strict=True)]


def classify_on_dask(address: str, classifier: Any, items: Sequence[tuple[str, Any]], *, top_k: int,
                     batch_size: int, threads: int | None,
                     on_progress: Callable[[int], None]) -> Iterator[dict[str, Any]]:
    """The records of ``items``, in input order, each task's as soon as it and those before it are done.
    A task that fails on the cluster (its worker died, or it raised) gives an error record for each of its
    images, as an unreadable image does; the other tasks' records are unaffected.

    Raises:
        DaskUnavailable: ``distributed`` is not installed, or no scheduler answers at ``address``.
    """
    try:
        from distributed import Client
    except ImportError:
        raise DaskUnavailable("--dask needs Dask's distributed scheduler: pip install 'dinat-np[dask]'") from None
    try:
        client = Client(address)
    except (OSError, TimeoutError, ValueError) as error:
        raise DaskUnavailable(f"--dask {address}: cannot reach the scheduler ({error})") from None
    with client:
        shared = client.scatter(classifier, broadcast=True)
        size = BATCHES_PER_TASK * batch_size
        tasks = [items[start:start + size] for start in range(0, len(items), size)]
        futures = [client.submit(classify_files, shared, task, top_k, batch_size, threads, pure=False)
                   for task in tasks]
        for task, future in zip(tasks, futures, strict=True):
            try:
                records = future.result()
            except Exception as error:  # on the cluster: a worker died (KilledWorker), ran out of memory, ...
                reason = f"the Dask task failed ({type(error).__name__}: {error})"
                records = [{"path": name, "error": reason} for name, _ in task]
            on_progress(len(records))
            yield from records
