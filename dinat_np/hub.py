"""Model registry, download and cache: turn a model name into a folder the engine can load.

``resolve_model("dinat-mini-in1k-224")`` returns ``$DINAT_NP_HOME/dinat-mini-in1k-224/`` (default
``~/.cache/dinat-np``), holding ``config.json`` + ``model.safetensors``.  On first use the original
SHI-Labs checkpoint is downloaded (progress on stderr) to ``$DINAT_NP_HOME/downloads/`` and converted
by :mod:`dinat_np.convert`.  Every step writes to a temporary name that is renamed only when
complete, so an interrupted download or conversion never leaves something that looks finished.

Environment:
    DINAT_NP_HOME      cache folder (default ``~/.cache/dinat-np``)
    DINAT_NP_OFFLINE   ``1`` forbids downloads (a missing model raises :class:`WeightsUnavailableError`)
    DINAT_NP_REGISTRY  path of a registry JSON to use instead of the packaged one
    DINAT_NP_BASE_URL  fetch checkpoints from ``BASE_URL/<file name>`` instead of their original host
                       (for mirrors and tests)
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import importlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from .configuration import make_shareable, read_json_object, write_atomic
from .staging import make_staging_file

__all__ = [
    "UnknownModelError",
    "WeightsUnavailableError",
    "DownloadError",
    "load_registry",
    "registry_entry",
    "resolve_model",
    "cache_home",
    "download",
]

ENV_HOME = "DINAT_NP_HOME"
ENV_OFFLINE = "DINAT_NP_OFFLINE"
ENV_REGISTRY = "DINAT_NP_REGISTRY"
ENV_BASE_URL = "DINAT_NP_BASE_URL"
_CHUNK = 1 << 20
_TIMEOUT = 60.0


class UnknownModelError(LookupError):
    """A name that is neither an existing folder nor a registry entry."""


class WeightsUnavailableError(RuntimeError):
    """A registry model that is not cached and cannot be downloaded (offline, no network, HTTP error).

    Attributes:
        name: the registry name.
        url: where the checkpoint comes from.
        target: the cache folder it would be converted to.
        reason: why it could not be fetched.
    """

    def __init__(self, name: str, url: str, target: Path, reason: str):
        self.name, self.url, self.target, self.reason = name, url, target, reason
        filename = Path(urllib.parse.urlparse(url).path).name or "CHECKPOINT.pth"
        super().__init__(
            f"model {name!r} is not in the cache ({target}) and cannot be downloaded: {reason}.\n"
            f"Its checkpoint is {url}\n"
            "Two ways out:\n"
            f"  1. fetch that file by hand (any machine with network access), convert it with\n"
            f"       dinat-convert {filename} DIR --model {name}\n"
            f"     and pass the folder: --weights DIR (or from_pretrained(\"DIR\")); using {target} as DIR\n"
            f"     makes the name {name!r} work from then on;\n"
            f"  2. connect to the network{' and unset ' + ENV_OFFLINE if _offline() else ''}, then retry."
        )


class DownloadError(WeightsUnavailableError):
    """A download that started but did not complete (cut transfer, bad checksum)."""


# ---------------------------------------------------------------------------------------------
# Registry


def _packaged_weights_dir() -> Path:
    return Path(importlib.import_module("dinat_np.weights").__file__).resolve().parent


def load_registry(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The registry's models by name (``path``, else ``$DINAT_NP_REGISTRY``, else the packaged one).

    Raises:
        ValueError: the registry file is not valid.
    """
    if path is None:
        path = os.environ.get(ENV_REGISTRY) or _packaged_weights_dir() / "registry.json"
    path = Path(path)
    try:
        data = read_json_object(path, "model registry")
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    models = data.get("models")
    if not isinstance(models, dict):
        raise ValueError(f"model registry {path} has no 'models' object")
    return models


def _as_models(registry: Mapping[str, Any] | str | os.PathLike | None) -> Mapping[str, Any]:
    if registry is None or isinstance(registry, (str, os.PathLike)):
        return load_registry(registry)
    return registry.get("models", registry) if isinstance(registry.get("models"), dict) else registry


def registry_entry(name: str, registry: Mapping[str, Any] | str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of one registry entry, with its ``"name"``; HF repo ids (``shi-labs/...``) work too.

    Raises:
        UnknownModelError: no such entry.
    """
    models = _as_models(registry)
    entry = models.get(name)
    if entry is None:
        entry = next((e for e in models.values() if e.get("hf_repo") and e.get("hf_repo") == name), None)
        if entry is not None:
            name = next(k for k, v in models.items() if v is entry)
    if entry is None:
        raise UnknownModelError(
            f"unknown model {name!r}: not a folder and not in the registry (known: {', '.join(sorted(models))})"
        )
    out = copy.deepcopy(dict(entry))
    out["name"] = name
    return out


# ---------------------------------------------------------------------------------------------
# Cache


def cache_home() -> Path:
    """``$DINAT_NP_HOME``, default ``~/.cache/dinat-np``."""
    home = os.environ.get(ENV_HOME)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "dinat-np"


def _offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no", "off")


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _checkpoint_url(entry: Mapping[str, Any], base_url: str | None) -> str:
    url = entry.get("url")
    if not url:
        raise UnknownModelError(f"registry entry {entry.get('name')!r} has no checkpoint URL")
    base = base_url if base_url is not None else os.environ.get(ENV_BASE_URL)
    if base:
        url = base.rstrip("/") + "/" + Path(urllib.parse.urlparse(url).path).name
    return url


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Progress:
    """A one-line progress bar on stderr (plain milestones when stderr is not a terminal)."""

    def __init__(self, label: str, total: int | None, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.milestone = 0
        if enabled:
            size = f" ({total / 1e6:.1f} MB)" if total else ""
            print(f"Downloading {label}{size}", file=sys.stderr, flush=True)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self.last < 0.2:
                return
            self.last = now
            rate = done / max(now - self.start, 1e-6) / 1e6
            if self.total:
                frac = min(done / self.total, 1.0)
                bar = "#" * int(frac * 30)
                line = f"\r  [{bar:<30}] {frac * 100:5.1f}%  {done / 1e6:.1f}/{self.total / 1e6:.1f} MB  {rate:.1f} MB/s"
            else:
                line = f"\r  {done / 1e6:.1f} MB  {rate:.1f} MB/s"
            print(line, end="", file=sys.stderr, flush=True)
        elif self.total:
            step = int(done * 4 / self.total)
            while self.milestone < min(step, 4):
                self.milestone += 1
                print(f"  {self.milestone * 25}%", file=sys.stderr, flush=True)

    def close(self, done: int, ok: bool) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.last = 0.0
            self.update(done)
            print("", file=sys.stderr, flush=True)
        if ok:
            print(f"  done: {done / 1e6:.1f} MB in {time.monotonic() - self.start:.1f} s", file=sys.stderr, flush=True)


def download(url: str, dest: Path, *, name: str, target: Path, expected_sha256: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Download ``url`` to ``dest`` (temporary file renamed when complete) and record its sha256.

    Writes ``dest`` and ``dest.json`` (url, size, sha256, time).  On any failure the partial file is
    removed and nothing named ``dest`` appears.

    Raises:
        WeightsUnavailableError: cannot connect / HTTP error.
        DownloadError: the transfer was cut, or the sha256 differs from ``expected_sha256``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "dinat-np"})
    fd, tmp = make_staging_file(dest, ".part")
    done = 0
    bar: _Progress | None = None
    try:
        try:
            response = urllib.request.urlopen(request, timeout=_TIMEOUT)
        except urllib.error.HTTPError as exc:
            raise WeightsUnavailableError(name, url, target, f"the server answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WeightsUnavailableError(name, url, target, f"no network connection to the host ({reason})") from None
        with response, os.fdopen(fd, "wb") as out:
            fd = -1
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _Progress(f"{name} from {url}", total, progress)
            digest = hashlib.sha256()
            try:
                while True:
                    chunk = response.read1(_CHUNK)  # what has arrived: counted even if the next read stalls
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(done)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(name, url, target, f"the transfer was interrupted after {done} bytes ({exc})") from None
            if total is not None and done != total:
                raise DownloadError(name, url, target,
                                    f"the transfer was interrupted after {done} of {total} bytes")
            if done == 0:
                raise DownloadError(name, url, target, "the server sent an empty file")
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        if expected_sha256 and sha != expected_sha256.lower():
            raise DownloadError(name, url, target, f"sha256 {sha} differs from the registry's {expected_sha256}")
        bar.close(done, ok=True)
        make_shareable(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if bar is not None:
            bar.close(done, ok=False)
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    record = {"url": url, "file": dest.name, "size": done, "sha256": sha,
              "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json_atomic(dest.with_name(dest.name + ".json"), record)
    return record


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _cached_download(url: str, downloads: Path, entry: Mapping[str, Any], target: Path,
                     progress: bool) -> tuple[Path, dict[str, Any]]:
    """A complete earlier download (its sha256 re-checked), or a fresh one."""
    filename = Path(urllib.parse.urlparse(url).path).name or f"{entry['name']}.pth"
    dest = downloads / filename
    sidecar = dest.with_name(dest.name + ".json")
    if dest.is_file() and sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            record = {}
        if record.get("sha256") and record.get("sha256") == _sha256(dest):
            return dest, record
    if _offline():
        raise WeightsUnavailableError(entry["name"], url, target, f"downloads are disabled ({ENV_OFFLINE}=1)")
    record = download(url, dest, name=entry["name"], target=target, expected_sha256=entry.get("sha256"),
                      progress=progress)
    return dest, record


def resolve_model(name_or_path: str | os.PathLike, *, registry: Mapping[str, Any] | str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None, base_url: str | None = None, dtype: str = "float32",
                  progress: bool = True) -> Path:
    """The folder (``config.json`` + ``model.safetensors``) for a folder path or a registry name.

    An existing folder is returned as is.  A registry name resolves to its packaged folder
    (``"local"`` entries) or to ``cache_dir/<name>`` (default :func:`cache_home`), downloading and
    converting the original checkpoint on first use.

    Args:
        name_or_path: a folder, a registry name, or the Hugging Face repo id of a registry entry.
        registry: registry dict or path (default: ``$DINAT_NP_REGISTRY`` or the packaged one).
        cache_dir: cache folder (default ``$DINAT_NP_HOME`` or ``~/.cache/dinat-np``).
        base_url: fetch ``base_url/<file name>`` instead of the entry's URL (mirrors, tests).
        dtype: storage dtype of a fresh conversion (``float32``, ``float16``, ``bfloat16``).
        progress: show a progress bar on stderr while downloading.

    Raises:
        UnknownModelError: neither a folder nor a registry name.
        WeightsUnavailableError: not cached and offline / no network (``DownloadError`` for cut transfers).
        dinat_np.convert.ConversionError: the downloaded checkpoint does not convert.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    if path.exists():
        raise UnknownModelError(
            f"{name} is a file, not a model folder: convert it first with `dinat-convert {name} DIR`"
        )
    entry = registry_entry(name, registry)
    name = entry["name"]
    local = entry.get("local")
    if local:
        folder = _packaged_weights_dir() / local
        if not _is_model_folder(folder):
            raise UnknownModelError(f"the packaged model {name!r} is missing from this installation ({folder})")
        return folder

    home = Path(cache_dir).expanduser() if cache_dir is not None else cache_home()
    target = home / name
    if _is_model_folder(target):
        return target
    url = _checkpoint_url(entry, base_url)
    checkpoint, record = _cached_download(url, home / "downloads", entry, target, progress)

    from .convert import ConversionError, convert_checkpoint  # heavy imports only when converting

    if progress:
        print(f"Converting {checkpoint.name} -> {target}", file=sys.stderr, flush=True)
    try:
        convert_checkpoint(checkpoint, target, model=name, dtype=dtype, overwrite=True,
                           registry={"models": {name: entry}},
                           provenance={"url": record.get("url", url), "sha256": record.get("sha256")})
    except ConversionError as exc:
        # A complete transfer of the wrong thing (an HTML error page, another model): do not keep it.
        checkpoint.unlink(missing_ok=True)
        checkpoint.with_name(checkpoint.name + ".json").unlink(missing_ok=True)
        raise ConversionError(f"the checkpoint downloaded for {name!r} from {url} does not convert "
                              f"(it was deleted): {exc}") from None
    return target
