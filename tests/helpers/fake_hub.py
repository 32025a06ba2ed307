"""A Hugging Face Hub on 127.0.0.1, answering what huggingface_hub (0.3x and 1.x) asks of the real one.

- ``HEAD``/``GET /{repo}/resolve/{revision}/{file}``: small files with ``ETag`` and ``X-Repo-Commit``;
  large files (weights) redirect to ``/cdn/{sha256}`` on ``localhost`` with ``X-Linked-Etag`` and
  ``X-Linked-Size``, as LFS files on the Hub do; the CDN honours ``Range`` (resumed downloads);
- ``GET /api/models/{repo}/revision/{revision}`` and ``/api/models/{repo}/tree/{revision}``;
- errors as the Hub reports them (``X-Error-Code``: RepoNotFound, RevisionNotFound, EntryNotFound);
- ``GET /files/{name}``: plain files (``hub.files``), as the host of the original checkpoints.

``hub.cut`` names files whose next transfer stops halfway; ``hub.requests`` records ``(method, path)``
for each request, ``hub.ranges`` the ``Range`` of resumed transfers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator

_LARGE = (".safetensors", ".bin")


def _git_sha1(blob: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.branches: dict[str, dict[str, str]] = {}  # repo -> branch or tag -> commit
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> files
        self.blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (file name, content)
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[str] = []  # the Range header of each resumed transfer
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()

    def publish(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit of ``files`` on ``branch``; returns its 40-hex id."""
        count = sum(len(c) for c in self.commits.values())
        commit = hashlib.sha1(f"{repo_id}:{count}:{sorted(files)}".encode()).hexdigest()
        self.commits.setdefault(repo_id, {})[commit] = dict(files)
        self.branches.setdefault(repo_id, {})[branch] = commit
        for name, blob in files.items():
            self.blobs[hashlib.sha256(blob).hexdigest()] = (name, blob)
        return commit

    def transfers(self, filename: str) -> int:
        """How many times the content of ``filename`` was sent (GETs of it, on the Hub, its CDN or /files)."""
        return sum(1 for method, path in self.requests
                   if method == "GET" and (path.endswith("/" + filename) or path.endswith("?file=" + filename)))


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server API
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args: object) -> None:
        pass

    # -- routing
    def _answer(self, body: bool) -> None:
        hub = self.server
        hub.requests.append((self.command, self.path))
        split = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in split.path.split("/")[1:]]
        if parts[:1] == ["files"] and len(parts) == 2:
            return self._file(parts[1], body)
        if parts[:1] == ["cdn"] and len(parts) == 2:
            return self._cdn(parts[1], body)
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            return self._api("/".join(parts[2:4]), parts[4], parts[5], body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        self._send(404, b"not found", {}, body)

    def _commit(self, repo_id: str, revision: str, body: bool) -> str | None:
        hub = self.server
        if repo_id not in hub.commits:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", body)
            return None
        commit = hub.branches[repo_id].get(revision, revision)
        if commit not in hub.commits[repo_id]:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return commit

    def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        commit = self._commit(repo_id, revision, body)
        if commit is None:
            return
        blob = self.server.commits[repo_id][commit].get(filename)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", body, {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_git_sha1(blob)}"'}
        if filename.endswith(_LARGE):
            sha256 = hashlib.sha256(blob).hexdigest()
            # Another host name for the same server, as the Hub's CDN is another host (huggingface_hub 1.x
            # follows redirects within the Hub and takes the metadata from a redirect elsewhere).
            cdn = self.server.url.replace("127.0.0.1", "localhost")
            headers.update({"Location": f"{cdn}/cdn/{sha256}?file={filename}",
                            "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(blob))})
            return self._send(302, b"", headers, body)
        self._send(200, blob, headers, body)

    def _cdn(self, sha256: str, body: bool) -> None:
        name, blob = self.server.blobs.get(sha256, (None, None))
        if blob is None:
            return self._send(404, b"no such blob", {}, body)
        start = 0
        requested = self.headers.get("Range", "")
        if requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[len("bytes="):-1])
            self.server.ranges.append(requested)
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(blob) - 1}/{len(blob)}"
        if body and name in self.server.cut:
            self.server.cut.discard(name)
            return self._send_cut(status, blob[start:], headers)
        self._send(status, blob[start:], headers, body)

    def _file(self, name: str, body: bool) -> None:
        blob = self.server.files.get(name)
        if blob is None:
            return self._send(404, b"no such file", {}, body)
        self._send(200, blob, {}, body)

    def _api(self, repo_id: str, kind: str, revision: str, body: bool) -> None:
        commit = self._commit(repo_id, revision, body)
        if commit is None:
            return
        files = self.server.commits[repo_id][commit]
        if kind == "revision":
            info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "disabled": False,
                    "siblings": [{"rfilename": name} for name in sorted(files)]}
        elif kind == "tree":
            info = []
            for name, blob in sorted(files.items()):
                item = {"type": "file", "path": name, "size": len(blob), "oid": _git_sha1(blob)}
                if name.endswith(_LARGE):
                    item["lfs"] = {"oid": hashlib.sha256(blob).hexdigest(), "size": len(blob), "pointerSize": 134}
                info.append(item)
        else:
            return self._send(404, b"not found", {}, body)
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    # -- answers
    def _error(self, status: int, code: str, message: str, body: bool, extra: dict | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(status, json.dumps({"error": message}).encode(), {**headers, **(extra or {})}, body)

    def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _send_cut(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        """Announce the whole length, send half of it, and drop the connection."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[: len(payload) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
