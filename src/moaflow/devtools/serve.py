"""A loopback HTTP file server that behaves like the Broad's web server.

It serves a folder (the stand-in's ``www/``) with ``Content-Length``,
single-range ``Range`` requests (``206 Partial Content``) and ``HEAD``, so the
real download code is exercised unchanged. Switches reproduce the awkward
servers a user meets: one that ignores ``Range``, one that is slow (so a
test can kill a client half-way), and per-file faults (`FAULTS`). It binds to
127.0.0.1 only.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from moaflow.errors import MoaflowError

LOOPBACK = "127.0.0.1"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
#: Per-file faults a test can ask for: an HTML error page served with status 200, an empty body,
#: a body cut at 60 % with no Content-Length, or a Content-Length shorter than the body.
FAULTS = ("html", "empty", "cut-no-length", "short-length")
_ERROR_PAGE = b"<!DOCTYPE html><html><body><h1>Service temporarily unavailable</h1></body></html>\n"


class _Handler(SimpleHTTPRequestHandler):
    server: "StandinServer"

    def log_request(self, code="-", size="-"):
        # One record per response; tests read which ranges were asked for.
        self.server.requests.append((self.command, self.path, self.headers.get("Range")))

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass  # keep test and demo output quiet

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        fault = self.server.faults.get(self.path)
        if fault is not None:
            return self._faulty(path, fault)
        size = path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        header = self.headers.get("Range")
        if header and not self.server.ignore_range:
            match = _RANGE.match(header.strip())
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else size - 1
                if start >= size:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                end = min(end, size - 1)
                status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if not self.server.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        handle = open(path, "rb")
        handle.seek(start)
        self._remaining = end - start + 1
        return handle

    def _faulty(self, path: Path, fault: str):
        data = path.read_bytes()
        body = {"html": _ERROR_PAGE, "empty": b"", "cut-no-length": data[: int(len(data) * 0.6)],
                "short-length": data}[fault]
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html" if fault == "html" else "application/octet-stream")
        if fault != "cut-no-length":
            length = int(len(data) * 0.6) if fault == "short-length" else len(body)
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self._remaining = len(body)
        return io.BytesIO(body)

    def copyfile(self, source, outputfile):
        remaining = self._remaining
        chunk = 64 * 1024 if self.server.rate is None else max(1024, self.server.rate // 20)
        while remaining > 0:
            block = source.read(min(chunk, remaining))
            if not block:
                break
            try:
                outputfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                return
            remaining -= len(block)
            if self.server.rate:
                time.sleep(len(block) / self.server.rate)


class StandinServer(ThreadingHTTPServer):
    """Serve ``root`` on 127.0.0.1.

    Parameters
    ----------
    root : path
        Folder to serve.
    port : int
        0 picks a free port; read it back from ``server.port``.
    ignore_range : bool
        Answer every request with the whole file (``200``), like servers
        without range support.
    rate : int, optional
        Throttle each response to about this many bytes per second.
    faults : dict, optional
        URL path (``"/BBBC021/x.csv"``) -> one of `FAULTS`.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root, port: int = 0, *, ignore_range: bool = False, rate: int | None = None,
                 faults: dict[str, str] | None = None):
        self.root = os.fspath(root)
        self.ignore_range = ignore_range
        self.rate = rate
        self.faults = dict(faults or {})
        unknown = sorted(set(self.faults.values()) - set(FAULTS))
        if unknown:
            raise ValueError(f"faults {unknown}: expected some of {FAULTS}")
        self.requests: list[tuple[str, str, str | None]] = []

        def handler(*args, **kwargs):
            return _Handler(*args, directory=self.root, **kwargs)

        try:
            super().__init__((LOOPBACK, port), handler)
        except OSError as exc:   # most often another stand-in (a rehearsal, the demo) already serves there
            raise MoaflowError(f"cannot serve {self.root} on {LOOPBACK}:{port} ({exc.strerror}): another server "
                               "uses the port; stop it or give this one another port (the config's standin.port "
                               "and the base_urls that name it)") from None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    def start(self) -> "StandinServer":
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="standin-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(root, port: int = 8021, *, ignore_range: bool = False, rate: int | None = None) -> None:
    """Serve a folder over HTTP on 127.0.0.1 until interrupted (with Range support).

    Parameters
    ----------
    root : path
        The folder served (a stand-in's ``www/``).
    port : int
        The loopback port.
    ignore_range : bool
        Behave like a server without Range support.
    rate : int, optional
        Throttle each response to about this many bytes/s.
    """
    server = StandinServer(root, port, ignore_range=ignore_range, rate=rate)
    print(f"serving {root} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
