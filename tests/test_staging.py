"""Staging names: what a later write sweeps (writer gone) and what it leaves (writer alive, elsewhere, not ours)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dinat_np import staging


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_sweep_removes_only_what_a_gone_writer_left(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    host, dead = staging._HOST, _dead_pid()
    stale_file = tmp_path / f".model.safetensors.{host}.{dead}.k3j2x9q1.tmp"
    stale_dir = tmp_path / f".model.safetensors.{host}.{dead}.zz9.tmp"
    kept = [
        tmp_path / f".model.safetensors.{host}.{os.getpid()}.live0001.tmp",  # this process: alive
        tmp_path / f".model.safetensors.other-host.{dead}.abc.tmp",  # another machine's: cannot be checked
        tmp_path / ".model.safetensors.k3j2x9q1.tmp",  # an older name without host and pid
        tmp_path / f".model.safetensors.{host}.{dead}.abc.part",  # another kind of staging
        tmp_path / f".other.bin.{host}.{dead}.abc.tmp",  # another target's
    ]
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "inside").write_bytes(b"x")
    for path in kept:
        path.write_bytes(b"keep")
    assert sorted(staging.sweep_stale(target, ".tmp")) == sorted([stale_file, stale_dir])
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_staging_names_carry_host_and_pid(tmp_path: Path) -> None:
    handle, path = staging.make_staging_file(tmp_path / "weights.bin", ".part")
    os.close(handle)
    folder = staging.make_staging_dir(tmp_path / "out", ".partial")
    assert path.name.startswith(f".weights.bin.{staging._HOST}.{os.getpid()}.") and path.name.endswith(".part")
    assert folder.name.startswith(f".out.{staging._HOST}.{os.getpid()}.") and folder.is_dir()
    assert staging.sweep_stale(tmp_path / "weights.bin", ".part") == []  # its writer (this process) runs


def test_sigterm_unwinds_like_ctrl_c() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    staging.raise_on_sigterm()
    try:
        with pytest.raises(staging.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
        assert issubclass(staging.Terminated, KeyboardInterrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)
