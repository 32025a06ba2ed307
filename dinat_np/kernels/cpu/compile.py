"""A cold start on two cores: the kernels a first forward needs, compiled by this process and a helper
process side by side, into Numba's on-disk cache.

With an empty cache, a first forward of dinat-mini spends about 21 s compiling its six parallel kernels
and their bands (``band.py``) one after the other (docs/performance.md has the table), on one core.
``compile_for(forward)`` runs before a model's first forward (``modeling_utils.PreTrainedModel``):

1. **Which kernels, with which signatures**: ``forward`` runs once with every kernel launch recorded
   instead of run (the ops allocate their outputs and launch nothing; the values computed are
   discarded), and with the bands the kernels are given. The list is the forward's own, so it follows
   the kernels and the model as they change, and a kernel the forward does not launch is not compiled.
2. **Which are missing**: each is looked up in this process and in Numba's cache (loading it, as the
   forward would). A warm cache ends here, a few milliseconds after the recording.
3. **Compiled in two processes**: a helper process (``python -m dinat_np.kernels.cpu.compile``) compiles
   part of the missing kernels, chosen so that both finish about together (``COMPILE_SECONDS``), while
   this process compiles the rest; Numba writes each to the cache (a temporary file renamed in place:
   never a half-written entry). Then this process loads the helper's kernels from the cache. When the
   cache looks cold from the start, the helper is started before step 1 and imports the kernels while
   the forward is recorded.

Whatever goes wrong with the helper (it cannot start, fails, or wrote its kernels where this process
does not read: a read-only or other cache directory), this process compiles what is still missing
itself: slower, never wrong, with a warning that says what went wrong (the end of the helper's stderr).
Nothing keeps running after ``compile_for`` returns.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import numba
import numpy as np
from numba.core import event
from numba.core.dispatcher import Dispatcher
from numba.core.typing import Signature

from . import attention, conv, norm, products
from .band import Band
from .threads import launching

# The modules whose functions launch kernels: their dispatchers are what a recording replaces.
KERNEL_MODULES = (attention, conv, norm, products)

# Seconds each kernel or band took to compile (dinat-mini's first forward on the 2-core development VM,
# AVX2, one after the other in one process; docs/performance.md). They only balance the two processes'
# shares: a kernel not listed counts as UNLISTED_SECONDS, and wrong figures make the start-up slower, never
# wrong.
COMPILE_SECONDS = {
    "_na_whole_groups_band": 4.5, "_na_sliding_band": 2.4, "_na_fused": 2.4, "_linear": 2.4,
    "_na_whole_groups": 2.2, "_direct_conv_rows": 2.0, "_conv3x3_s2": 1.7, "_mlp": 1.4, "_layer_norm": 0.9,
    "_epilogue_rows": 0.9, "_im2col_rows": 0.8, "_im2col_3x3_s2": 1.0,
}
UNLISTED_SECONDS = 1.0
# The helper's own start (a Python process importing NumPy, Numba and the kernels) before it compiles.
HELPER_START_SECONDS = 1.0
# A helper still running after this long is stopped, and this process compiles its share.
HELPER_TIMEOUT_SECONDS = 600.0


class Kernel(NamedTuple):
    """One kernel launch of a forward, or a band it was given: the dispatcher's (or band's) module and name,
    its Numba signature, and stand-ins for its arguments that a helper process can rebuild the same
    signature from (None where it cannot; none needed for a band, whose signature is declared)."""

    module: str
    name: str
    signature: tuple | Signature
    stand_ins: tuple | None

    @property
    def dispatcher(self) -> Dispatcher:
        target = getattr(importlib.import_module(self.module), self.name)
        return target.dispatcher if isinstance(target, Band) else target

    @classmethod
    def of_band(cls, band: Band) -> Kernel:
        return cls(band.module, band.name, band.signature(), ())  # whole, as Band.compile gives it


class Startup(NamedTuple):
    """What :func:`compile_for` did (for tests and the benchmark)."""

    kernels: tuple[str, ...]  # the kernels the forward launches, in order
    compiled_here: tuple[str, ...]  # compiled by this process
    compiled_by_helper: tuple[str, ...]  # compiled by the helper and loaded from the cache
    helper_failed: bool  # a helper was started but did not deliver its share (this process compiled it)
    helper_problem: str = ""  # what went wrong with it, as the warning says


# ---------------------------------------------------------------------------------------------------------
# 1. Recording a forward's kernels
# ---------------------------------------------------------------------------------------------------------
_SGEMM = "kernel_sgemm"  # the stand-in for the products' sgemm argument, a ctypes function (not picklable)


def _stand_in(value: Any) -> Any:
    """A small picklable value of the same Numba type as ``value`` (arrays: same dtype, dimensions, layout)."""
    if isinstance(value, np.ndarray):
        if value.flags.c_contiguous:
            array = np.empty((0,) * value.ndim, value.dtype)
        elif value.flags.f_contiguous:
            array = np.empty((2,) * value.ndim, value.dtype, order="F")
        else:  # neither: a strided view
            array = np.empty((2,) * (value.ndim - 1) + (4,), value.dtype)[..., ::2]
        array.setflags(write=value.flags.writeable)
        return array
    if value is not None and value is products.kernel_sgemm():
        return _SGEMM
    return value


def _rebuilt(stand_in: Any) -> Any:
    return products.kernel_sgemm() if isinstance(stand_in, str) and stand_in == _SGEMM else stand_in


class _Recorder:
    """Stands in for a dispatcher or a band during a recording: notes the signature of each call, and the
    bands passed to it, runs nothing."""

    def __init__(self, module: str, name: str, target: Dispatcher | Band, launched: dict[tuple, Kernel]) -> None:
        self.module, self.name, self.target, self.launched = module, name, target, launched

    def _note(self, kernel: Kernel) -> None:
        self.launched.setdefault((kernel.module, kernel.name, kernel.signature), kernel)

    def __call__(self, *args: Any) -> None:
        args = tuple(a.target if isinstance(a, _Recorder) else a for a in args)  # a band passed as an argument
        for band in (a for a in args if isinstance(a, Band)):
            self._note(Kernel.of_band(band))
        if isinstance(self.target, Band):  # a band run on its own
            self._note(Kernel.of_band(self.target))
            return
        signature = tuple(self.target.typeof_pyval(a) for a in args)
        if (self.module, self.name, signature) not in self.launched:
            stand_ins = tuple(_stand_in(a) for a in args)
            rebuilt = tuple(self.target.typeof_pyval(_rebuilt(s)) for s in stand_ins)
            try:
                pickle.dumps(stand_ins)
            except (pickle.PicklingError, TypeError, AttributeError):
                stand_ins = None
            self._note(Kernel(self.module, self.name, signature, stand_ins if rebuilt == signature else None))


_recording_now = False  # a recording is under way (its thread holds the launch lock)


@contextmanager
def _recording(launched: dict[tuple, Kernel]) -> Iterator[None]:
    # The kernel modules' dispatchers are replaced while the launch lock is held: other threads' launches
    # wait (the ops look their kernel up inside `launching()`), and nothing compiles meanwhile.
    global _recording_now
    with launching():
        replaced, outer = [], _recording_now
        _recording_now = True
        try:
            for module in KERNEL_MODULES:
                for name, value in list(vars(module).items()):
                    if isinstance(value, (Dispatcher, Band)):
                        replaced.append((module, name, value))
                        setattr(module, name, _Recorder(module.__name__, name, value, launched))
            yield
        finally:
            _recording_now = outer
            for module, name, value in replaced:
                setattr(module, name, value)


def kernels_launched_by(forward: Callable[[], Any]) -> list[Kernel]:
    """The kernels ``forward`` launches, each signature once, in order; recorded, not run (see the module
    docstring). ``forward``'s result is garbage and discarded."""
    launched: dict[tuple, Kernel] = {}
    with _recording(launched), np.errstate(all="ignore"):  # uninitialised outputs: any value, quietly
        forward()
    return list(launched.values())


# ---------------------------------------------------------------------------------------------------------
# 2. What is missing
# ---------------------------------------------------------------------------------------------------------
class _WouldCompile(Exception):
    pass


def _load(kernel: Kernel) -> bool:
    """Whether the kernel is compiled in this process, or could be loaded from Numba's cache (it is now);
    False where it would have to be compiled (nothing is compiled here)."""
    dispatcher = kernel.dispatcher

    class RefuseCompiling(event.Listener):  # Numba announces a compile after it found no cache entry
        def on_start(self, ev: event.Event) -> None:
            if ev.data["dispatcher"] is dispatcher:
                raise _WouldCompile

        def on_end(self, ev: event.Event) -> None:
            pass

    try:
        with event.install_listener("numba:compile", RefuseCompiling()):
            dispatcher.compile(kernel.signature)
    except _WouldCompile:
        return False
    return True


def _cache_writable(kernels: list[Kernel]) -> bool:
    """Whether Numba can write every kernel's cache entry where this process (and a helper) reads it."""
    for kernel in kernels:
        path = kernel.dispatcher.stats.cache_path
        if path is None or not os.access(path, os.W_OK):
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# 3. Compiling in two processes
# ---------------------------------------------------------------------------------------------------------
def _seconds(kernel: Kernel) -> float:
    return COMPILE_SECONDS.get(kernel.name, UNLISTED_SECONDS)


def split(kernels: list[Kernel], helper_late: float = 0.0) -> tuple[list[Kernel], list[Kernel]]:
    """(this process's share, the helper's): the longest first, each to whichever finishes it sooner
    (the helper starts ``helper_late`` seconds late); kernels without stand-ins stay here."""
    here = [k for k in kernels if k.stand_ins is None]
    helper: list[Kernel] = []
    load_here, load_helper = sum(map(_seconds, here)), helper_late
    for kernel in sorted((k for k in kernels if k.stand_ins is not None), key=_seconds, reverse=True):
        if load_here <= load_helper:
            here.append(kernel)
            load_here += _seconds(kernel)
        else:
            helper.append(kernel)
            load_helper += _seconds(kernel)
    return here, helper


def _helper_command() -> list[str]:
    return [sys.executable, "-m", __name__]


def _start_helper() -> tuple[subprocess.Popen, IO[bytes]] | None:
    """A helper process, which imports the kernels and waits for its share on stdin (``_hand_over``), and
    the file its stderr goes to; or None where none starts."""
    package_root = str(Path(__file__).resolve().parents[3])  # the same dinat_np, the same cache entries
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    # a file, not a pipe: a long traceback cannot block the helper (compile_for closes it)
    errors = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        helper = subprocess.Popen(_helper_command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=errors, env={**os.environ, "PYTHONPATH": path})
    except OSError:
        errors.close()
        return None
    return helper, errors


def _hand_over(helper: subprocess.Popen, kernels: list[Kernel]) -> None:
    """Gives the helper its share: the kernels' stand-ins."""
    try:
        helper.stdin.write(pickle.dumps([(k.module, k.name, k.stand_ins) for k in kernels]))
        helper.stdin.close()
    except OSError:  # it died
        pass


def _cache_looks_cold() -> bool:
    """Whether this process has run no kernel yet and the products' epilogue band, which every model
    launches, is not in Numba's cache (it is loaded if it is): then a helper is started before the forward
    is recorded, and imports the kernels meanwhile (about a second). (Not asked during a recording, which
    replaces the kernels.)"""
    kernels = [value for module in KERNEL_MODULES for value in vars(module).values()]
    compiled = (k.dispatcher if isinstance(k, Band) else k for k in kernels if isinstance(k, (Dispatcher, Band)))
    return not any(d.overloads for d in compiled) and not _load(Kernel.of_band(products._epilogue_rows))


def _last_lines(errors: IO[bytes], lines: int = 5) -> str:
    errors.seek(0)
    return " | ".join(errors.read().decode(errors="replace").strip().splitlines()[-lines:])


def _helper_main() -> int:
    """The helper: compile the kernels whose stand-ins arrive on stdin into Numba's cache, then exit."""
    for module, name, stand_ins in pickle.loads(sys.stdin.buffer.read()):
        target = getattr(importlib.import_module(module), name)
        if isinstance(target, Band):
            target.compile()
        else:
            target.compile(tuple(target.typeof_pyval(_rebuilt(s)) for s in stand_ins))
    return 0


# Reentrant: a classifier's first call records its forward, which makes its base model's first call.
_COMPILING = threading.RLock()


def helper_wanted() -> bool:
    """Whether a cold start may start a helper process: not where ``DINAT_NP_COMPILE_HELPER=0`` says no, nor
    where this process may use one CPU only (two compiling processes would share it, and the helper's start
    would be lost time)."""
    # Numba's default thread count is the number of CPUs this process may use (its affinity where known)
    return os.environ.get("DINAT_NP_COMPILE_HELPER", "1") != "0" and numba.config.NUMBA_DEFAULT_NUM_THREADS > 1


def compile_for(forward: Callable[[], Any], parallel: bool | None = None) -> Startup:
    """Make sure the kernels ``forward`` launches are compiled or loaded from the cache, compiling the
    missing ones in two processes (``parallel``, by default ``helper_wanted()``) where more than one is
    missing (see the module docstring)."""
    parallel = helper_wanted() if parallel is None else parallel
    with _COMPILING:
        if _recording_now:  # a model's first call inside a recording: its launches are recorded there
            return Startup((), (), (), False)
        # with an empty cache, the helper imports the kernels while this process records the forward
        helper, errors = (_start_helper() if parallel and _cache_looks_cold() else None) or (None, None)
        problem = ""
        try:
            kernels = kernels_launched_by(forward)
            missing = [k for k in kernels if not _load(k)]
            # a helper started now is ready HELPER_START_SECONDS late; one started before the recording is ready
            late = 0.0 if helper is not None else HELPER_START_SECONDS
            here, helper_share = (split(missing, late) if parallel and len(missing) > 1 and _cache_writable(missing)
                                  else (missing, []))
            if helper_share and helper is None:  # the cache looked warm, but is not for this forward
                helper, errors = _start_helper() or (None, None)
            if helper is None:
                here, helper_share = missing, []
            elif helper_share:
                _hand_over(helper, helper_share)
            else:  # started for nothing
                helper.kill()
            for kernel in here:
                kernel.dispatcher.compile(kernel.signature)
            if helper_share:
                try:
                    status = helper.wait(HELPER_TIMEOUT_SECONDS)
                    if status != 0:
                        problem = f"exit status {status}: {_last_lines(errors)}"
                except subprocess.TimeoutExpired:
                    problem = f"still running after {HELPER_TIMEOUT_SECONDS:g} s, stopped"
        finally:
            if helper is not None:
                if helper.poll() is None:
                    helper.kill()
                helper.wait()
                errors.close()
        for kernel in helper_share:
            if not _load(kernel):  # the helper failed, or its cache entry is not where this process reads
                problem = problem or f"{kernel.name} is not in this process's Numba cache after it"
                kernel.dispatcher.compile(kernel.signature)
        if problem:
            warnings.warn(f"dinat-np: the process compiling kernels beside this one failed ({problem}); this "
                          "process compiled its share", RuntimeWarning, stacklevel=2)
        return Startup(tuple(k.name for k in kernels), tuple(k.name for k in here),
                       tuple(k.name for k in helper_share), bool(problem), problem)


if __name__ == "__main__":
    sys.exit(_helper_main())
