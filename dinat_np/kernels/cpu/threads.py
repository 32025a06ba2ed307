"""Numba's threading layer for the CPU kernels, and the CPU backend's process-wide set-up.

Nothing here acts on import: ``set_up_process`` does, once, when the backend is first obtained
(``get_backend("cpu")``) or, for direct users of the package, before its first kernel launch or thread
count (``launching``, ``thread_count``, ``set_num_threads``), which is before Numba's thread pool starts.
It chooses the threading layer and raises glibc's malloc thresholds (``malloc``).

A batch-1 forward launches about 100 kernels. Threads that sleep between kernels (Numba's "workqueue"
layer) must be woken for each one, and a kernel waits for its last thread; threads that spin for long
(GNU OpenMP's default, up to ~20 ms) take the cores from anything else that needs them, OpenBLAS's own
threads above all where the products go through NumPy (a forward many times slower). So on Linux the
kernels run on GNU OpenMP with a bounded spin (``GOMP_SPINCOUNT``, read once when libgomp loads;
longer where the products run inside the kernels, see ``_spin_count``): lower batch-1 latency than
workqueue, batch 8 unchanged. Where that cannot be ensured (not Linux, no GNU OpenMP, or libgomp
already loaded with whatever spin it read) the kernels use workqueue. The choice is written to the
environment (``NUMBA_THREADING_LAYER``, and ``GOMP_SPINCOUNT`` with it), because Numba re-reads its
configuration from there, and so that child processes make the same one. ``NUMBA_THREADING_LAYER``
already in the environment wins; ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` there are left to libgomp.

On OpenMP, a process forked from one that has run the kernels cannot run them (GNU OpenMP's threads
do not survive fork, and Numba would terminate the child): launches there raise a RuntimeError that
says what to do instead. The workqueue layer aborts the process when two Python threads launch
parallel kernels at once, so every launch is serialised (``launching``): concurrent model calls
interleave kernel by kernel instead.

While other processes keep cores busy, the launches run on fewer threads, as many as the cores left free
(Linux; ``sharing`` says how and why), splitting their work as on all of them (``thread_count``). Each
launch reads the clock; the one that is due samples the others' CPU time and gives its caller the adapted
count (Numba's count is per Python thread: other threads that launch get it at their own samples). It stays
off where the user fixed the thread count or the spin: ``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS``,
``GOMP_SPINCOUNT`` (other than the one this set-up writes, which child processes inherit) or
``OMP_WAIT_POLICY`` in the environment at set-up, ``set_num_threads`` (``dinat-classify --threads``),
Numba's count changed directly (noticed at the next sample), or ``DINAT_NP_ADAPT_THREADS=0``.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import warnings
from contextlib import suppress
from typing import Any, NamedTuple

import numba

from .band import raise_if_a_band_failed
from .blas import Blas, bound_idle_spin
from .gemm import PRODUCTS
from .malloc import raise_thresholds
from .sharing import ProcStat, ThreadAdapter, adaptation_asked


# Spin iterations of an idle GNU OpenMP thread before it sleeps (3000 is ~0.2 ms on the development VM):
# long enough to bridge the Python between two kernels. Where the products run on OpenBLAS's own threads
# (NumPy's matmul, see gemm.PRODUCTS) it must also be short next to a product, or the spinning threads
# take the cores from OpenBLAS; with the products inside the kernels no other pool waits for the cores,
# and 30000 (~2 ms) still lets a caller's own NumPy products have them soon after a forward.
def _spin_count() -> str:
    return "3000" if PRODUCTS == "numpy" else "30000"


def _libgomp_loaded() -> bool:
    """Whether a ``libgomp.so*`` is mapped into this process already (it has read its spin settings).

    Copies bundled under another file name (``libgomp-<hash>.so``) are separate runtimes and don't count.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("/libgomp.so" in line for line in maps)
    except OSError:
        return True  # unknown: assume the worst


def _choose_threading_layer() -> str | None:
    """Numba's threading layer for the kernels (see the module docstring), before Numba's pool starts;
    the layer asked for, or None where the pool had already started on whatever layer it chose."""
    try:
        running = numba.threading_layer()  # raises until Numba's thread pool has started
    except ValueError:
        running = None
    if running is not None:
        # Chosen by whatever ran parallel Numba code first; only the spin of OpenMP can still hurt.
        spin_set = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
        if running == "omp" and not spin_set:
            warnings.warn(
                "Numba's thread pool was started (on OpenMP) before dinat_np set up its CPU backend; if its "
                "idle threads spin long they slow the matrix products several times over. Obtain the backend "
                "(dinat_np.kernels.get_backend('cpu'), or build a model) first, or set GOMP_SPINCOUNT=3000 "
                "or NUMBA_THREADING_LAYER=workqueue.",
                RuntimeWarning, stacklevel=4,
            )
        return None
    if "NUMBA_THREADING_LAYER" not in os.environ:
        os.environ["NUMBA_THREADING_LAYER"] = "omp" if _gnu_openmp_with_bounded_spin() else "workqueue"
    numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]
    return numba.config.THREADING_LAYER


def _gnu_openmp_with_bounded_spin() -> bool:
    """Load GNU OpenMP with ``GOMP_SPINCOUNT`` set (unless the user set the spin), if that is possible."""
    if not sys.platform.startswith("linux") or _libgomp_loaded():
        return False
    spin_added = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    if spin_added:
        os.environ["GOMP_SPINCOUNT"] = _spin_count()
    try:
        from numba.np.ufunc import omppool  # loads libgomp, which reads the spin settings now
        gnu = getattr(omppool, "openmp_vendor", None) == "GNU"  # Intel's runtime spins per KMP_BLOCKTIME
    except ImportError:
        gnu = False
    if not gnu and spin_added:
        del os.environ["GOMP_SPINCOUNT"]
    return gnu


_forked_from_openmp = False


def _note_fork_in_child() -> None:
    global _forked_from_openmp
    with suppress(ValueError):  # raised where the parent never started the pool: the child may
        _forked_from_openmp = numba.threading_layer() == "omp"  # the parent ran kernels on OpenMP


class ProcessSetUp(NamedTuple):
    """What :func:`set_up_process` did."""

    threading_layer: str | None  # the layer asked of Numba; None where its pool had started before
    malloc_tuned: bool  # glibc's malloc thresholds raised (see ``malloc``)
    openblas_spin_bounded: bool  # NumPy's OpenBLAS, loaded before, given the short idle spin (see ``blas``)
    threads_adapted: bool  # the thread count follows the cores other processes leave free (see ``sharing``)


# Set by the user, these fix the thread count or the threads' spin: no adaptation then.
USER_THREAD_SETTINGS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def _user_fixed_threads_or_spin() -> bool:
    """Whether one of USER_THREAD_SETTINGS is set, other than the spin dinat-np writes itself (which a child
    process inherits: set by its parent's set-up, it is not the user's)."""
    ours = {"GOMP_SPINCOUNT": _spin_count()}
    return any(os.environ.get(name, ours.get(name)) != ours.get(name) for name in USER_THREAD_SETTINGS)


def _thread_adapter() -> ThreadAdapter | None:
    """The adaptation of the thread count, where allowed (asked before the set-up writes GOMP_SPINCOUNT)."""
    if not adaptation_asked() or _user_fixed_threads_or_spin():
        return None
    try:
        stat = ProcStat()
    except (OSError, AttributeError):  # no /proc/stat or no sched_getaffinity: not Linux
        return None
    return ThreadAdapter(numba.config.NUMBA_NUM_THREADS, len(stat.cpus), stat)


_SET_UP_LOCK = threading.Lock()
_process_set_up: ProcessSetUp | None = None
_adapter: ThreadAdapter | None = None  # where the adaptation is allowed
_NEVER = math.inf
_next_sample = _NEVER  # when a launch next samples the others' CPU time (never: the adaptation is off)
_applied = threading.local()  # .threads: the count the adaptation last gave this Python thread


def set_up_process() -> ProcessSetUp:
    """The CPU backend's process-wide set-up, done once (later calls return the same record): Numba's
    threading layer chosen and written to the environment, a fork handler registered, glibc's malloc
    thresholds raised (see the module docstring and ``malloc``), NumPy's OpenBLAS given a short idle spin
    (``blas.bound_idle_spin``), the thread count's adaptation to other processes started where allowed."""
    global _process_set_up, _adapter, _next_sample
    if _process_set_up is not None:  # every launch asks: no lock once done
        return _process_set_up
    with _SET_UP_LOCK:
        if _process_set_up is None:
            _adapter = _thread_adapter()
            _next_sample = _NEVER if _adapter is None else _adapter.next_sample
            threading_layer = _choose_threading_layer()
            if hasattr(os, "register_at_fork"):  # POSIX only
                os.register_at_fork(after_in_child=_note_fork_in_child)
            _process_set_up = ProcessSetUp(threading_layer, raise_thresholds(), bound_idle_spin(),
                                           _adapter is not None)
        return _process_set_up


def thread_count() -> int:
    """Into how many parts a launch splits its work: Numba's thread count, or while that adapts to other
    processes, the count it adapts from. The parts then run on fewer threads, and the results do not depend on
    the machine's load: OpenBLAS rounds differently for products of other shapes. (Asking starts Numba's
    pool: the process is set up first.)"""
    set_up_process()
    return numba.get_num_threads() if _next_sample == _NEVER else _adapter.most


def set_num_threads(threads: int) -> None:
    """Number of threads the parallel kernels use (starts Numba's pool: the process is set up first); fixed
    from now on: the adaptation to other processes stops."""
    global _next_sample
    set_up_process()
    with _LAUNCH_LOCK:
        _next_sample = _NEVER
        numba.set_num_threads(threads)


def adapt_thread_count(enabled: bool) -> bool:
    """Turn the adaptation of the thread count to other processes on or off (``benchmarks/bench_cpu.py``
    compares the two); off, the calling thread gets the full count back. Returns whether it is on: never
    where it is not allowed (see the module docstring)."""
    global _next_sample
    set_up_process()
    with _LAUNCH_LOCK:
        if _adapter is None:
            return False
        _next_sample = _clock() if enabled else _NEVER  # on: the next launch samples
        if not enabled:
            numba.set_num_threads(_adapter.most)
            _applied.threads = _adapter.most
    return enabled


def _follow_other_processes(now: float) -> None:
    """Sample, and give the calling thread the adapted count unless its user set another one through Numba
    (theirs wins: the adaptation stops). Other Python threads that launch get it when they sample."""
    global _next_sample
    threads = _adapter.sample(now)
    _next_sample = _adapter.next_sample
    current = numba.get_num_threads()
    if current != getattr(_applied, "threads", _adapter.most):
        _next_sample = _NEVER
    elif current != threads:
        numba.set_num_threads(threads)
        _applied.threads = threads


_LAUNCH_LOCK = threading.RLock()
_clock = time.monotonic  # the adapter's clock too (the tests fake both)


class launching:
    """Held around every parallel kernel launch (see the module docstring); raises after a kernel whose band
    failed. ``blas``: NumPy's OpenBLAS where the kernel calls its products, kept single-threaded meanwhile.

    A class rather than generator-based context managers: entered ~100 times per forward, and its Python
    runs with caches the kernels have just filled with other data (two generator contexts cost ~10 us more
    per launch).
    """

    __slots__ = ("_blas", "_blas_threads")

    def __init__(self, blas: Blas | None = None) -> None:
        self._blas = blas

    def __enter__(self) -> None:
        set_up_process()
        if _forked_from_openmp:
            raise RuntimeError(
                "this process was forked from one that had already run dinat-np's kernels on GNU OpenMP, whose "
                "threads do not survive fork(): load and run models only in the child processes, start them with "
                "multiprocessing's 'spawn' or 'forkserver' method, or set NUMBA_THREADING_LAYER=workqueue "
                "before dinat_np is imported"
            )
        _LAUNCH_LOCK.acquire()
        try:
            now = _clock()
            if now >= _next_sample:  # every launch asks: one clock read
                _follow_other_processes(now)
            if self._blas is not None:
                # Process-wide (OpenBLAS has no per-thread setting: NumPy products that other Python threads
                # start meanwhile also run on one thread); set once per launch, not per call, because two
                # kernel threads setting and restoring it would race.
                self._blas_threads = self._blas.set_num_threads(1)
        except BaseException:
            _LAUNCH_LOCK.release()
            raise

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        try:
            if self._blas is not None:
                self._blas.set_num_threads(self._blas_threads)
            if kind is None:
                raise_if_a_band_failed()
        finally:
            _LAUNCH_LOCK.release()
