"""Names to model folders: the Hugging Face Hub, the original SHI-Labs checkpoints, one cache, locks.

``resolve_model(name)`` returns a folder holding ``config.json`` + ``model.safetensors`` (and the
source's ``preprocessor_config.json`` when it has one):

- an existing folder is returned as is; a registry entry shipped with the package (``"local"``) too;
- a Hugging Face repository (a registry entry's ``hf_repo``, or any ``org/name`` whose ``config.json``
  describes a DiNAT or NAT model): ``config.json``, ``preprocessor_config.json`` and the weights
  (``model.safetensors``, else ``pytorch_model.bin``, read by the project's pickle reader that runs no
  code) come through ``huggingface_hub`` into the standard HF cache, which honours ``HF_HOME``,
  ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` as transformers does; they are
  converted once into ``$DINAT_NP_HOME/hub/models--ORG--NAME/COMMIT/``;
- a registry entry's original SHI-Labs URL (the only source of the in22k models): the checkpoint is
  downloaded to ``$DINAT_NP_HOME/downloads/`` and converted into ``$DINAT_NP_HOME/NAME/``.

A name with both sources takes the Hub first; when one source cannot deliver, the other is used and
stderr says so. Every step writes under a temporary name that is renamed only when complete, and a
file lock per model lets one of several racing processes download and convert while the others wait
and reuse its result.

Environment:
    DINAT_NP_HOME      cache of converted models (default ``~/.cache/dinat-np``)
    DINAT_NP_OFFLINE   ``1`` forbids downloads from either source (as ``HF_HUB_OFFLINE=1`` does)
    DINAT_NP_REGISTRY  path of a registry JSON to use instead of the packaged one
    DINAT_NP_BASE_URL  fetch original checkpoints from ``BASE_URL/<file name>`` (mirrors, tests)
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import filelock

from .configuration import make_shareable, read_json_object, write_atomic
from .registry import UnknownModelError, load_registry, packaged_weights_dir, registry_entry
from .staging import make_staging_file

if TYPE_CHECKING:
    from .convert import WeightsCheck

__all__ = [
    "DownloadError",
    "SourceFailure",
    "UnknownModelError",
    "WeightsUnavailableError",
    "cache_home",
    "cached_folders",
    "cached_repo_ids",
    "download",
    "load_registry",
    "registry_entry",
    "resolve_model",
]

ENV_HOME = "DINAT_NP_HOME"
ENV_OFFLINE = "DINAT_NP_OFFLINE"
ENV_BASE_URL = "DINAT_NP_BASE_URL"
HF_OFFLINE = "HF_HUB_OFFLINE"
_CHUNK = 1 << 20
_TIMEOUT = 60.0
_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in order of preference


# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class SourceFailure:
    """Why one source could not deliver a model, and what a user can do about that source."""

    source: str
    reason: str
    way_out: str
    url: str | None = None


class WeightsUnavailableError(RuntimeError):
    """A model that is not cached and that none of its sources can deliver (offline, no network, HTTP error).

    Attributes:
        name: the model's name.
        target: the cache folder it would be converted to.
        failures: one :class:`SourceFailure` per source tried.
        reason: the first source's reason; url: the original checkpoint's URL, if it was tried.
    """

    def __init__(self, name: str, target: Path, failures: Sequence[SourceFailure]):
        self.name, self.target, self.failures = name, target, list(failures)
        self.reason = self.failures[0].reason
        self.url = next((f.url for f in self.failures if f.url), None)
        lines = [f"model {name!r} is not in the cache and cannot be downloaded:"]
        lines += [f"  from {f.source}: {f.reason}" for f in self.failures]
        lines.append("Ways out:")
        ways = [f.way_out for f in self.failures]
        switches = [v for v in (ENV_OFFLINE, HF_OFFLINE) if _flag(v)]
        ways.append("connect to the network" + (f" and unset {' and '.join(switches)}" if switches else "")
                    + ", then retry.")
        lines += [f"  {i}. {way}" for i, way in enumerate(ways, 1)]
        super().__init__("\n".join(lines))


class DownloadError(WeightsUnavailableError):
    """A download that started but did not complete (cut transfer, bad checksum)."""


def _url_failure(name: str, url: str, target: Path, reason: str) -> SourceFailure:
    filename = Path(urllib.parse.urlparse(url).path).name or "CHECKPOINT.pth"
    way_out = (f"fetch {url} by hand (any machine with network access), convert it with\n"
               f"       dinat-convert {filename} DIR --model {name}\n"
               f"     and pass the folder: --weights DIR (or from_pretrained(\"DIR\")); using {target} as DIR\n"
               f"     makes the name {name!r} work from then on;")
    return SourceFailure(url, reason, way_out, url=url)


def _hub_failure(repo_id: str, revision: str | None, reason: str) -> SourceFailure:
    pinned = f" --revision {revision}" if revision else ""
    way_out = (f"on a machine with network access, fill a Hugging Face cache with\n"
               f"       hf download {repo_id}{pinned}   (huggingface-cli download in huggingface_hub 0.x)\n"
               f"     and copy it into this machine's cache (HF_HUB_CACHE, or cache_dir=...);")
    return SourceFailure(f"the Hugging Face Hub ({repo_id}{', revision ' + revision if revision else ''})",
                         reason, way_out)


# ---------------------------------------------------------------------------------------------
# Cache, environment, locks


def cache_home() -> Path:
    """``$DINAT_NP_HOME``, default ``~/.cache/dinat-np``."""
    home = os.environ.get(ENV_HOME)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "dinat-np"


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no", "off")


def _offline_reason(local_files_only: bool) -> str | None:
    """Why downloads are off (``None`` when they are allowed)."""
    if local_files_only:
        return "downloads are disabled (local_files_only=True)"
    switched = [v for v in (ENV_OFFLINE, HF_OFFLINE) if _flag(v)]
    return f"downloads are disabled ({switched[0]}=1)" if switched else None


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _exclusive(home: Path, key: str, what: str, progress: bool) -> Iterator[None]:
    """Hold the cache's lock ``key`` (one download and conversion at a time); others wait, saying so."""
    locks = home / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(locks / f"{key}.lock"))
    try:
        lock.acquire(timeout=1)
    except filelock.Timeout:
        if progress:
            print(f"Waiting for another process to finish {what}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _convert_into(target: Path, source: Path, *, what: str, check_weights: WeightsCheck, entry: Mapping | None,
                  dtype: str, provenance: Mapping[str, Any], progress: bool) -> None:
    """Convert a downloaded checkpoint (file or HF folder) into the cache folder ``target``."""
    from .convert import convert_checkpoint  # heavy imports only when converting

    if progress:
        print(f"Converting {what} -> {target}", file=sys.stderr, flush=True)
    name = entry["name"] if entry is not None else None
    convert_checkpoint(source, target, check_weights=check_weights, model=name, dtype=dtype, overwrite=True,
                       registry={"models": {name: entry}} if entry is not None else None, provenance=provenance)


# ---------------------------------------------------------------------------------------------
# The original checkpoints (SHI-Labs URLs)


def _checkpoint_url(entry: Mapping[str, Any], base_url: str | None) -> str:
    url = entry["url"]
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
                line = (f"\r  [{bar:<30}] {frac * 100:5.1f}%  {done / 1e6:.1f}/{self.total / 1e6:.1f} MB  "
                        f"{rate:.1f} MB/s")
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
    def unavailable(reason: str, kind: type[WeightsUnavailableError] = WeightsUnavailableError) -> Exception:
        return kind(name, target, [_url_failure(name, url, target, reason)])

    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "dinat-np"})
    fd, tmp = make_staging_file(dest, ".part")
    done = 0
    bar: _Progress | None = None
    try:
        try:
            response = urllib.request.urlopen(request, timeout=_TIMEOUT)
        except urllib.error.HTTPError as exc:
            raise unavailable(f"the server answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise unavailable(f"no network connection to the host ({reason})") from None
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
                raise unavailable(f"the transfer was interrupted after {done} bytes ({exc})", DownloadError) from None
            if total is not None and done != total:
                raise unavailable(f"the transfer was interrupted after {done} of {total} bytes", DownloadError)
            if done == 0:
                raise unavailable("the server sent an empty file", DownloadError)
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        if expected_sha256 and sha != expected_sha256.lower():
            raise unavailable(f"sha256 {sha} differs from the registry's {expected_sha256}", DownloadError)
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
    record = download(url, dest, name=entry["name"], target=target, expected_sha256=entry.get("sha256"),
                      progress=progress)
    return dest, record


def _from_url(entry: Mapping[str, Any], home: Path, *, base_url: str | None, offline: str | None,
              check_weights: WeightsCheck, dtype: str, progress: bool) -> Path:
    """The original checkpoint, downloaded and converted into ``home/NAME`` (once, under the name's lock)."""
    from .convert import ConversionError

    name = entry["name"]
    target = home / name
    if _is_model_folder(target):
        return target
    url = _checkpoint_url(entry, base_url)
    if offline:
        raise WeightsUnavailableError(name, target, [_url_failure(name, url, target, offline)])
    with _exclusive(home, name, f"downloading and converting {name}", progress):
        if _is_model_folder(target):  # done by the process we waited for
            return target
        checkpoint, record = _cached_download(url, home / "downloads", entry, target, progress)
        try:
            _convert_into(target, checkpoint, what=checkpoint.name, check_weights=check_weights, entry=entry,
                          dtype=dtype, provenance={"url": record.get("url", url), "sha256": record.get("sha256")},
                          progress=progress)
        except ConversionError as exc:
            # A complete transfer of the wrong thing (an HTML error page, another model): do not keep it.
            checkpoint.unlink(missing_ok=True)
            checkpoint.with_name(checkpoint.name + ".json").unlink(missing_ok=True)
            raise ConversionError(f"the checkpoint downloaded for {name!r} from {url} does not convert "
                                  f"(it was deleted): {exc}") from None
    return target


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub (through huggingface_hub)


def _hub_folder(home: Path, repo_id: str) -> Path:
    """Where the converted commits of a Hub repository live (named as the HF cache names repositories)."""
    return home / "hub" / ("models--" + repo_id.replace("/", "--"))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed transfer raises: OSError, and the errors of the HTTP library huggingface_hub uses
    (requests' are OSErrors; httpx's, in 1.x, and httpx2's, in 2.x, are not), found as the
    ``HTTPError`` that its ``HfHubHTTPError`` derives from."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError,) + tuple(base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError")


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _check_model_type(config_path: Path, repo_id: str) -> None:
    """A repository named by id alone must hold a DiNAT or NAT model."""
    try:
        model_type = read_json_object(config_path, "model configuration").get("model_type")
    except ValueError as error:
        raise UnknownModelError(f"{repo_id}: {error}") from None
    if model_type not in ("dinat", "nat"):
        raise UnknownModelError(f"{repo_id} is not a DiNAT or NAT model (its config.json says model_type "
                                f"{model_type!r}); dinat-np runs only those")


def _from_hub(repo_id: str, entry: Mapping[str, Any] | None, home: Path, *, revision: str | None,
              cache_dir: str | os.PathLike | None, offline: str | None, token: str | bool | None,
              check_weights: WeightsCheck, dtype: str, progress: bool) -> Path:
    """A Hub repository's files through huggingface_hub, converted once per commit into
    ``home/hub/models--ORG--NAME/COMMIT``."""
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = entry["name"] if entry is not None else repo_id
    base = _hub_folder(home, repo_id)

    def fetch(filename: str, at: str | None) -> Path:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=at, cache_dir=cache_dir,
                                                    local_files_only=offline is not None, token=token))

    def fetch_if_present(filename: str, commit: str) -> Path | None:
        """None when the repository lacks the file: the Hub said so, now or on an earlier visit."""
        try:
            return fetch(filename, commit)
        except EntryNotFoundError as error:
            unknown = isinstance(error, LocalEntryNotFoundError) and huggingface_hub.try_to_load_from_cache(
                repo_id, filename, cache_dir=cache_dir, revision=commit) is None
            if unknown:
                raise
            return None

    def unavailable(reason: str, kind: type[WeightsUnavailableError] = WeightsUnavailableError) -> Exception:
        return kind(name, base, [_hub_failure(repo_id, revision, reason)])

    try:
        with _hub_progress_bars(progress):
            config_path = fetch("config.json", revision)
            commit = config_path.parent.name  # the file's snapshot folder is named by its commit
            target = base / commit
            if _is_model_folder(target):
                return target
            if entry is None:
                _check_model_type(config_path, repo_id)
            with _exclusive(home, f"{base.name}--{commit}", f"downloading and converting {repo_id}", progress):
                if _is_model_folder(target):  # done by the process we waited for
                    return target
                fetch_if_present("preprocessor_config.json", commit)
                for filename in _HUB_WEIGHTS:
                    weights = fetch_if_present(filename, commit)
                    if weights is not None:
                        break
                else:
                    raise unavailable(f"the repository has neither {' nor '.join(_HUB_WEIGHTS)}")
                _convert_into(target, config_path.parent, what=f"{repo_id}@{commit[:12]} ({weights.name})",
                              check_weights=check_weights, entry=entry, dtype=dtype, progress=progress,
                              provenance={"hf_repo": repo_id, "revision": revision or "main", "commit": commit})
            return target
    except RevisionNotFoundError:
        raise UnknownModelError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        if entry is None:
            raise UnknownModelError(
                f"unknown model {repo_id!r}: not a folder, not in the registry, and the Hugging Face Hub has no "
                "such repository (a private or gated one needs a token: HF_TOKEN or `hf auth login`)"
            ) from None
        raise unavailable("the repository does not exist (or is private: set HF_TOKEN)") from None
    except EntryNotFoundError as error:
        if isinstance(error, LocalEntryNotFoundError):
            cause = error.__cause__ or error.__context__
            raise unavailable(offline or f"the Hub cannot be reached ({cause or error})") from None
        if entry is None:
            raise UnknownModelError(f"{repo_id} has no config.json: not a transformers model repository") from None
        raise unavailable("the repository has no config.json") from None
    except _transport_errors() as error:
        raise unavailable(f"the transfer failed ({type(error).__name__}: {error})", DownloadError) from None


# ---------------------------------------------------------------------------------------------
# Names to folders


def _is_repo_id(name: str) -> bool:
    """``org/name`` as the Hub spells repository ids (letters, digits, ``-``, ``_``, ``.``)."""
    parts = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return len(parts) == 2 and all(p and p[0] not in "-." and set(p) <= allowed and len(p) <= 96 for p in parts)


def resolve_model(name_or_path: str | os.PathLike, *, check_weights: WeightsCheck, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                  token: str | bool | None = None, registry: Mapping[str, Any] | str | os.PathLike | None = None,
                  base_url: str | None = None, dtype: str = "float32", progress: bool = True) -> Path:
    """The folder (``config.json`` + ``model.safetensors``) for a folder, a registry name or a Hub repo id.

    Args:
        name_or_path: a folder, a registry name, the Hub repo id of a registry entry, or any Hub repo
            id of a DiNAT / NAT model (``org/name``).
        check_weights: the model check a conversion runs (``dinat_np.modeling.check_weights``).
        revision: a Hub branch, tag or commit (default ``main``); pins the Hub source, so a name
            given with a revision is never served from its original checkpoint instead.
        cache_dir: the Hugging Face cache to download into (default ``HF_HUB_CACHE``, as transformers).
        local_files_only: no network: only what the caches hold (as ``HF_HUB_OFFLINE=1``).
        token: Hub token for private or gated repositories (default: ``HF_TOKEN`` or the stored login).
        registry: registry dict or path (default: ``$DINAT_NP_REGISTRY`` or the packaged one).
        base_url: fetch original checkpoints from ``base_url/<file name>`` (mirrors, tests).
        dtype: storage dtype of a fresh conversion (``float32``, ``float16``, ``bfloat16``).
        progress: progress bars and messages (conversion, a fallback to the other source) on stderr.

    Raises:
        UnknownModelError: not a folder, a registry name, nor a DiNAT / NAT Hub repository (or no such
            revision).
        WeightsUnavailableError: not cached and no source can deliver (``DownloadError`` for cut
            transfers); the message says why for each source and the ways out.
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
    try:
        entry: dict[str, Any] | None = registry_entry(name, registry)
    except UnknownModelError:
        if not _is_repo_id(name):
            raise
        entry = None
    if entry is not None and entry.get("local"):
        folder = packaged_weights_dir() / entry["local"]
        if not _is_model_folder(folder):
            raise UnknownModelError(
                f"the packaged model {entry['name']!r} is missing from this installation ({folder})")
        return folder

    home = cache_home()
    offline = _offline_reason(local_files_only)
    repo_id = entry.get("hf_repo") if entry is not None else name
    options = dict(check_weights=check_weights, dtype=dtype, progress=progress)
    sources: list[tuple[str, Callable[[], Path]]] = []
    if repo_id:
        sources.append((f"the Hugging Face Hub ({repo_id})", lambda: _from_hub(
            repo_id, entry, home, revision=revision, cache_dir=cache_dir, offline=offline, token=token, **options)))
    if entry is not None and entry.get("url") and revision is None:
        sources.append((f"the original checkpoint ({entry['url']})", lambda: _from_url(
            entry, home, base_url=base_url, offline=offline, **options)))
    if not sources:
        raise UnknownModelError(f"model {entry['name']!r}: a revision applies to Hugging Face repositories, and its "
                                "registry entry has none" if revision is not None
                                else f"registry entry {entry['name']!r} names no source (hf_repo, url or local)")
    errors: list[WeightsUnavailableError] = []
    for label, fetch in sources:
        try:
            folder = fetch()
        except WeightsUnavailableError as error:
            errors.append(error)
            continue
        if errors and progress:
            print(f"{errors[0].failures[0].source} cannot deliver {errors[0].name!r} ({errors[0].reason}); "
                  f"using {label} instead", file=sys.stderr, flush=True)
        return folder
    if len(errors) == 1:
        raise errors[0]
    kind = DownloadError if all(isinstance(e, DownloadError) for e in errors) else WeightsUnavailableError
    raise kind(errors[0].name, errors[-1].target, [f for e in errors for f in e.failures])


def cached_folders(name: str, registry: Mapping[str, Any] | str | os.PathLike | None = None) -> list[Path]:
    """The converted folders the cache holds for a registry name or Hub repo id (no network)."""
    try:
        entry: dict[str, Any] | None = registry_entry(name, registry)
    except UnknownModelError:
        entry = None
    home = cache_home()
    if entry is not None and entry.get("local"):
        folder = packaged_weights_dir() / entry["local"]
        return [folder] if _is_model_folder(folder) else []
    repo_id = entry.get("hf_repo") if entry is not None else name
    found = []
    if repo_id and _is_repo_id(repo_id) and _hub_folder(home, repo_id).is_dir():
        found += sorted(f for f in _hub_folder(home, repo_id).iterdir() if _is_model_folder(f))
    if entry is not None and _is_model_folder(home / entry["name"]):
        found.append(home / entry["name"])
    return found


def cached_repo_ids() -> list[str]:
    """The Hub repositories that have a converted commit in the cache (no network)."""
    hub_folder = cache_home() / "hub"
    if not hub_folder.is_dir():
        return []
    return sorted(folder.name.removeprefix("models--").replace("--", "/") for folder in hub_folder.glob("models--*")
                  if any(_is_model_folder(commit) for commit in folder.iterdir()))
