"""A local HTTP file server on 127.0.0.1, with transfers that stop halfway or stall on request."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator


class _FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` by name; ``/cut/NAME`` announces the full length but sends half;
    ``/stall/NAME`` sends 1000 bytes, then nothing until ``server.release`` is set (or 60 s)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.server.requests.append(self.path)
        cut = self.path.startswith("/cut/")
        stall = self.path.startswith("/stall/")
        blob = self.server.files.get(self.path.rsplit("/", 1)[-1])
        if blob is None:
            self.send_error(404, "no such file")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        if stall:
            self.wfile.write(blob[:1000])
            self.wfile.flush()
            self.server.release.wait(60)
            return
        self.wfile.write(blob[: len(blob) // 2] if cut else blob)
        if cut:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_file_server(files: dict[str, bytes]) -> Iterator[http.server.ThreadingHTTPServer]:
    """Serve ``files`` (name -> bytes) on 127.0.0.1; the server has ``.url`` and ``.requests``."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    httpd.files, httpd.requests, httpd.release = files, [], threading.Event()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()
