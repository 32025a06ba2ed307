"""Sharing the cores: the kernels' thread count follows the cores that other processes leave free (Linux).

Every kernel splits its work statically, one part per thread, and ends when its last part does. When
other processes keep a core busy, one of the kernels' threads shares that core and is descheduled for a
time slice (milliseconds) now and then, and each of the ~100 kernels of a forward may wait for it: beside
one busy loop on 2 cores, batch 1 took about 5x its idle time, where the one core left should cost about
2x. A niced process of another session does the same: Linux shares the CPU between sessions (autogroups)
before it looks at nice. So while other processes take a core's worth of CPU time or more, the kernels
run on fewer threads, as many as the cores the others leave (their work is still split into as many parts
as before, ``threads.thread_count``, so that the results do not change).

How: at a kernel launch, at most every ``SAMPLE_S`` (nothing runs in the background), the CPU time spent
on this process's CPUs (``/proc/stat``: busy = user, nice, system, irq, softirq and a hypervisor's steal)
minus this process's own (``time.process_time``, every thread) since the previous sample gives the cores
the others took, hence ``free`` = CPUs - those. The count moves down when ``free < threads - DOWN_MARGIN``
and up when ``free >= threads + UP_MARGIN``, to about ``free`` (``adapted_threads``). The gap keeps it
from flapping, and it is wide upwards because the others get more CPU time once the kernels take less.
The others' CPU time is measured whatever the kernels' count, so when they stop the count comes back at
the next sample. But others of lower priority (niced in this session, or a session of lower weight)
take the cores the kernels leave and give them back when asked: so ``PROBE_S`` after going down, the
count goes one up for one sample, and stays there if the others then leave enough free; each probe
that goes down again doubles the wait before the next one (up to ``PROBE_MAX_S``: beside an equal
competitor, about one slower forward every 16 s). Where such others give back only part of a core the
probes fail, and the kernels stay on fewer threads than would be faster (see docs/perf-journal.md). A sample costs
~10-15 us (reading ``/proc/stat``); the check at each launch, a clock read. This process's other
threads count as its own, not as others.

``threads`` wires this in: where the user fixed the thread count or the threads' spin it stays off (see
``threads``), and ``DINAT_NP_ADAPT_THREADS=0`` turns it off.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

SAMPLE_S = 0.1  # seconds between samples, at least: long enough for /proc/stat's 10 ms ticks
DOWN_MARGIN = 0.5  # fewer threads when the cores left are this far below the count (others > ~half a core)
UP_MARGIN = 0.65  # more threads when the cores left are this far above it
PROBE_S = 1.0  # a thread more for one sample this long after going down (others of lower priority yield)...
PROBE_MAX_S = 16.0  # ... and twice as long after each probe that went down again, up to this

# /proc/stat's per-CPU columns after the name: user nice system idle iowait irq softirq steal guest guest_nice
# (guest time is counted in user and nice already).
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def adaptation_asked() -> bool:
    """Whether ``DINAT_NP_ADAPT_THREADS`` leaves the adaptation on (unset, or anything but ``0``)."""
    return os.environ.get("DINAT_NP_ADAPT_THREADS", "1") != "0"


def adapted_threads(threads: int, most: int, free: float) -> int:
    """The thread count after ``threads``, with ``free`` cores left by the others (at most ``most`` threads)."""
    if free < threads - DOWN_MARGIN:
        return max(1, math.floor(free + 0.5))
    if free >= threads + UP_MARGIN:
        return min(most, math.floor(free + 1 - UP_MARGIN))
    return threads


def busy_seconds(stat: bytes, cpus: frozenset[int] | None, tick_s: float) -> float:
    """CPU time spent busy on ``cpus`` (numbers; None: all of them), in seconds, from the text of ``/proc/stat``."""
    if cpus is None:  # the first line, "cpu", is the total
        return sum(int(column) for column in _busy_columns(stat[:stat.index(b"\n")])) * tick_s
    busy = 0
    for line in stat.split(b"\n")[1:]:
        if not line.startswith(b"cpu"):
            break  # the per-CPU lines come first
        if int(line[3:line.index(b" ")]) in cpus:
            busy += sum(int(column) for column in _busy_columns(line))
    return busy * tick_s


def _busy_columns(line: bytes) -> list[bytes]:
    columns = line.split()[1:]
    return [columns[column] for column in _BUSY_COLUMNS]


class ProcStat:
    """Busy CPU time on this process's CPUs (``busy_seconds`` of ``/proc/stat``), read through one open file."""

    def __init__(self) -> None:
        self._file = os.open("/proc/stat", os.O_RDONLY)  # OSError where there is none
        self.cpus = frozenset(os.sched_getaffinity(0))
        stat = os.pread(self._file, 1 << 20, 0)
        every = {int(line[3:line.index(b" ")]) for line in stat.split(b"\n")[1:] if line.startswith(b"cpu")}
        self._cpus = None if self.cpus == every else self.cpus  # None: the total line is enough
        # enough for the lines it reads (a sample reads no more: /proc/stat's interrupt counts can be long)
        self._size = 256 * (1 + (0 if self._cpus is None else max(every) + 1))
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK")

    def __call__(self) -> float:
        return busy_seconds(os.pread(self._file, self._size, 0), self._cpus, self._tick_s)


class ThreadAdapter:
    """The adapted thread count (``threads``) of up to ``most`` threads on ``cpus`` CPUs, updated by ``sample``.

    ``busy`` gives the busy CPU time of those CPUs so far, ``own`` this process's CPU time, ``clock`` the time
    (seconds, all three); the tests fake them.
    """

    def __init__(self, most: int, cpus: int, busy: Callable[[], float], own: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.most, self.threads, self._cpus = most, most, cpus
        self._busy, self._own, self.clock = busy, own, clock
        self._previous = (clock(), busy(), own())
        self.next_sample = self._previous[0] + SAMPLE_S
        self._probing = False  # the count was raised at the previous sample to see whether the others yield
        self._probe_wait = PROBE_S
        self._probe_at = math.inf

    def sample(self, now: float) -> int:
        """Read the others' CPU time since the previous sample and adapt the count; returns it."""
        busy, own = self._busy(), self._own()
        then, busy_then, own_then = self._previous
        others = max(0.0, (busy - busy_then) - (own - own_then)) / max(now - then, 1e-9)
        threads = adapted_threads(self.threads, self.most, self._cpus - others)
        if threads < self.threads:  # down; after a probe, the next one waits twice as long
            self._probe_wait = min(2 * self._probe_wait, PROBE_MAX_S) if self._probing else PROBE_S
            self._probe_at, self._probing = now + self._probe_wait, False
        elif threads == self.threads < self.most and now >= self._probe_at:
            threads, self._probing = threads + 1, True
        elif self._probing:  # the others yielded to the probe: the next one, if any, comes as soon as the first
            self._probe_wait, self._probe_at, self._probing = PROBE_S, now + PROBE_S, False
        self.threads = threads
        self._previous = (now, busy, own)
        self.next_sample = now + SAMPLE_S
        return threads
