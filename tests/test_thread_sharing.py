"""The kernels' thread count adapting to other processes (``dinat_np.kernels.cpu.sharing``): the controller on
faked readings, its wiring into the launches, and a model's results the same whatever the count."""

from __future__ import annotations

import math
import sys

import numba
import numpy as np
import pytest

from dinat_np.kernels.cpu import sharing, threads
from dinat_np.kernels.cpu.sharing import ThreadAdapter, adapted_threads, busy_seconds

LINUX = sys.platform.startswith("linux")


@pytest.mark.parametrize("threads_now, most, free, expected", [
    (2, 2, 2.0, 2), (2, 2, 1.6, 2),  # others under half a core: kept
    (2, 2, 1.4, 1), (2, 2, 1.0, 1), (2, 2, 0.1, 1),  # a core's worth taken: down, never below one
    (1, 2, 1.0, 1), (1, 2, 1.6, 1),  # hysteresis: not up until the others leave clearly more than the count
    (1, 2, 1.7, 2), (1, 2, 2.0, 2),
    (8, 8, 7.1, 7), (8, 8, 5.2, 5), (7, 8, 7.0, 7), (7, 8, 7.5, 7), (5, 8, 8.0, 8), (3, 8, 6.0, 6),
    (1, 1, 0.2, 1), (1, 1, 3.0, 1),  # one thread at most: nothing to adapt
])
def test_adapted_threads(threads_now, most, free, expected):
    assert adapted_threads(threads_now, most, free) == expected


def test_busy_seconds_counts_only_the_given_cpus_and_busy_columns():
    stat = (b"cpu  900 900 900 900 900 900 900 900 900 900\n"
            b"cpu0 10 20 30 1000 500 1 2 3 40 50\n"  # user nice system idle iowait irq softirq steal guest guest_nice
            b"cpu1 100 0 0 0 0 0 0 0 0 0\n"
            b"cpu12 7 0 0 0 0 0 0 0 0 0\n"
            b"intr 12345 1 2 3\nctxt 99\n")
    assert busy_seconds(stat, frozenset({0}), 0.01) == pytest.approx(0.66)  # 10+20+30+1+2+3 ticks
    assert busy_seconds(stat, frozenset({0, 12}), 0.01) == pytest.approx(0.73)
    assert busy_seconds(stat, frozenset({5}), 0.01) == 0.0
    assert busy_seconds(stat, None, 0.01) == pytest.approx(54.0)  # the total line: 6 columns of 900


class FakeMachine:
    """Readings for a ThreadAdapter: each clock read is ``step`` seconds later; the others and this process take
    ``others`` and ``own`` cores meanwhile."""

    def __init__(self, others: float = 0.0, own: float = 0.0, step: float = 0.25) -> None:
        self.others, self.own, self.step = others, own, step
        self.now = self.busy_s = self.own_s = 0.0

    def clock(self) -> float:
        self.now += self.step
        self.busy_s += (self.others + self.own) * self.step
        self.own_s += self.own * self.step
        return self.now

    def adapter(self, most: int = 2, cpus: int = 2) -> ThreadAdapter:
        return ThreadAdapter(most, cpus, busy=lambda: self.busy_s, own=lambda: self.own_s, clock=self.clock)


def test_adapter_follows_the_others_with_hysteresis():
    machine = FakeMachine(own=1.0)
    adapter = machine.adapter()
    counts = []
    for others in (0.0, 1.0, 1.0, 0.45, 0.2, 0.45, 0.7):
        machine.others = others
        counts.append(adapter.sample(machine.clock()))
    assert counts == [2, 1, 1, 1, 2, 2, 1]


def run_beside(machine: FakeMachine, adapter: ThreadAdapter, others: dict[int, float], seconds: float) -> list[tuple]:
    """Samples for ``seconds``, the others taking ``others[count]`` cores while the adapter uses ``count``
    threads; returns (time, count) at each change of the count."""
    changes = []
    while machine.now < seconds:
        machine.others = others[adapter.threads]
        before = adapter.threads
        if adapter.sample(machine.clock()) != before:
            changes.append((machine.now, adapter.threads))
    return changes


def test_adapter_probes_a_thread_more_and_keeps_it_when_the_others_yield():
    machine = FakeMachine(step=0.125)
    adapter = machine.adapter()
    # an equal competitor first: it takes a core; one of lower priority then (nice): it takes the core the
    # kernels leave, and yields it when they ask
    assert run_beside(machine, adapter, {2: 0.7, 1: 1.0}, 1.0) == [(0.25, 1)]
    assert run_beside(machine, adapter, {2: 0.05, 1: 1.0}, 3.0) == [(1.25, 2)]  # a probe, kept


def test_adapter_probes_less_often_while_they_fail():
    machine = FakeMachine(step=0.125)  # exact in binary: the times below are exact
    adapter = machine.adapter()
    changes = run_beside(machine, adapter, {2: 0.7, 1: 1.0}, 50.0)
    probes = [at for at, count in changes if count == 2]
    # each probe goes down at the next sample, and the next probe waits twice as long, up to PROBE_MAX_S
    assert [b - a for a, b in zip(probes[:-1], probes[1:], strict=True)] == [2.125, 4.125, 8.125, 16.125, 16.125]


def test_adapter_does_not_count_its_own_cpu_time_as_the_others():
    machine = FakeMachine(others=0.0, own=2.0)  # this process alone keeps both cores busy (its spinning threads)
    adapter = machine.adapter()
    assert [adapter.sample(machine.clock()) for _ in range(3)] == [2, 2, 2]


def test_adapter_samples_at_most_every_sample_interval():
    machine = FakeMachine(step=0.01)
    adapter = machine.adapter()
    assert adapter.next_sample == pytest.approx(machine.now + sharing.SAMPLE_S)


@pytest.mark.skipif(not LINUX, reason="/proc/stat is Linux's")
def test_proc_stat_reads_the_busy_time_of_this_process_cpus():
    stat = sharing.ProcStat()
    first = stat()
    sum(range(3_000_000))  # some CPU time
    assert stat.cpus and stat() >= first > 0


@pytest.mark.parametrize("name", [*threads.USER_THREAD_SETTINGS, "DINAT_NP_ADAPT_THREADS"])
def test_no_adaptation_where_the_user_fixed_threads_or_spin_or_turned_it_off(monkeypatch, name):
    for other in (*threads.USER_THREAD_SETTINGS, "DINAT_NP_ADAPT_THREADS"):
        monkeypatch.delenv(other, raising=False)
    if LINUX:
        assert isinstance(threads._thread_adapter(), ThreadAdapter)
    monkeypatch.setenv(name, "0" if name == "DINAT_NP_ADAPT_THREADS" else "1")
    assert threads._thread_adapter() is None


@pytest.mark.skipif(not LINUX, reason="the adaptation reads /proc/stat")
def test_the_spin_a_parent_process_wrote_is_not_the_users(monkeypatch):
    for name in (*threads.USER_THREAD_SETTINGS, "DINAT_NP_ADAPT_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", threads._spin_count())  # as a child process inherits it
    assert isinstance(threads._thread_adapter(), ThreadAdapter)


def adapting() -> bool:
    return threads._next_sample != math.inf


@pytest.fixture
def faked_adapter(monkeypatch):
    """The launches of this process follow a ThreadAdapter on a FakeMachine (two threads at most, two CPUs);
    Numba's count of this thread is restored afterwards."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has a single thread here")
    threads.set_up_process()
    machine = FakeMachine()
    original = numba.get_num_threads()
    numba.set_num_threads(2)
    threads._applied.threads = 2
    monkeypatch.setattr(threads, "_adapter", machine.adapter())
    monkeypatch.setattr(threads, "_clock", machine.clock)
    monkeypatch.setattr(threads, "_next_sample", 0.0)
    yield machine
    numba.set_num_threads(original)
    threads._applied.threads = original


def test_launches_run_on_the_adapted_count_and_a_model_gives_the_same_results(faked_adapter, products):
    from dinat_np import DinatConfig, DinatForImageClassification

    config = DinatConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], dilations=[[1, 2], [1, 1]], kernel_size=3,
                         num_labels=5)
    model = DinatForImageClassification(config, seed=3)
    rng = np.random.default_rng(8)
    # 448 and 180 rows in stage 1: products split by rows or by columns depending on the count
    for pixels in (rng.standard_normal((2, 3, 64, 56)), rng.standard_normal((2, 3, 40, 36))):
        pixels = pixels.astype(np.float32)
        faked_adapter.others = 0.0
        both = model(pixels).logits
        assert numba.get_num_threads() == 2
        faked_adapter.others = 1.0  # a busy loop: one core left
        one = model(pixels).logits
        assert numba.get_num_threads() == 1 and threads.thread_count() == 2  # the work split in two all the same
        assert np.abs(both).max() > 1e-3  # a real comparison, not of zeros
        np.testing.assert_array_equal(one, both)  # whatever the load (OpenBLAS rounds by the products' shapes)


def test_numbas_count_set_by_the_user_wins(faked_adapter):
    from dinat_np.kernels import cpu
    from dinat_np.kernels.common import Norm

    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    norm = Norm(np.ones(16, np.float32), np.zeros(16, np.float32), 1e-5)
    numba.set_num_threads(1)  # directly, behind the adaptation's back
    faked_adapter.others = 1.0
    cpu.layer_norm(x, norm)
    assert not adapting()
    numba.set_num_threads(2)
    cpu.layer_norm(x, norm)
    assert numba.get_num_threads() == 2


def test_set_num_threads_stops_the_adaptation(faked_adapter):
    threads.set_num_threads(2)
    assert not adapting()
    assert threads.adapt_thread_count(True) is True  # on again, for comparisons (bench_cpu)
    assert threads.adapt_thread_count(False) is False and numba.get_num_threads() == 2
