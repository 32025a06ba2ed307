"""Staging names for work in progress, removal of those a killed process left behind, and SIGTERM.

Every file or folder dinat-np writes is first made under a hidden staging name beside its target and
renamed when complete. The staging name carries its writer's host and process id
(``.model.safetensors.myhost.1234.k3j2x9q1.tmp``), so that a later write to the same target can tell
a stale one (its writer was killed with SIGKILL, or the machine went down) from one being written
right now, and remove it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["Terminated", "make_staging_dir", "make_staging_file", "raise_on_sigterm", "sweep_stale"]

# Letters, digits and '-' only (no '.', which separates the fields); short enough for long target names.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds the stack as Ctrl-C does, so that staging files are removed on the way."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` (call from the main thread of a command-line program).

    Python's default is to die at once, which skips every ``finally`` and leaves staging files behind.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)


def _prefix(target: Path) -> str:
    return f".{target.name}.{_HOST}.{os.getpid()}."


def make_staging_file(target: Path, suffix: str) -> tuple[int, Path]:
    """A new private file beside ``target`` (open descriptor and path), after sweeping stale ones."""
    sweep_stale(target, suffix)
    handle, name = tempfile.mkstemp(prefix=_prefix(target), suffix=suffix, dir=target.parent)
    return handle, Path(name)


def make_staging_dir(target: Path, suffix: str) -> Path:
    """A new private folder beside ``target``, after sweeping stale ones."""
    sweep_stale(target, suffix)
    return Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=suffix, dir=target.parent))


def _writer_is_gone(host: str, pid: str) -> bool:
    if os.name != "posix" or host != _HOST or not pid.isdigit():
        # Another machine's (shared folders) cannot be checked from here; and on Windows os.kill
        # does not probe, it stops the process.
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive, owned by another user (or not a pid at all)
    return False


def sweep_stale(target: Path, suffix: str) -> list[Path]:
    """Remove staging files or folders of ``target`` whose writer no longer runs; returns them."""
    removed = []
    start = f".{target.name}."
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed  # the folder does not exist yet (or cannot be listed): nothing to sweep
    for entry in entries:
        if not (entry.name.startswith(start) and entry.name.endswith(suffix)):
            continue
        fields = entry.name[len(start):-len(suffix)].rsplit(".", 2)  # host, pid, random part
        if len(fields) != 3 or not _writer_is_gone(fields[0], fields[1]):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
