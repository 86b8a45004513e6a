"""Serve a folder of images on loopback so the download stage runs for real without the internet.

    with ImageServer("shapes/") as server:
        url_list_for_folder(server, "sources/shapes.parquet")
        ...  # download from server.base_url

``ImageServer`` is a :class:`~http.server.ThreadingHTTPServer` running in a
background thread, bound to 127.0.0.1 on a free port by default, with no
request logging. ``GET /<path>`` returns the file ``<directory>/<path>`` with
its image content type (404 if absent; paths cannot leave the directory).

Faults, for tests and demos, are asked for by a path prefix
``/_fault/<kind>/<path>`` (:func:`image_url` builds such URLs):

``404``
    404 Not Found, whether or not the file exists.
``500``
    500 Internal Server Error.
``stall``
    200 with the image headers (and the full ``Content-Length``), then the
    body only after ``stall_seconds`` — longer than a sane client timeout, so
    the client times out while reading. ``stop()`` wakes stalled handlers
    (which then close the connection without a body); handler threads are
    daemons, so nothing can keep the process alive either.
``html``
    200 with an HTML page and ``Content-Type: text/html`` instead of the image.
``truncate``
    200 with the image content type and only the first half of its bytes.
``noai``
    The image, with the response header ``X-Robots-Tag: noai`` (a publisher's
    opt-out that img2dataset honours by default).
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

import data_schemas.sources as sources_schema
from dalle_lightning.datasets.parquet_io import WrittenFile, write_parquet_atomic

FAULT_PREFIX = "_fault"
FAULTS = ("404", "500", "stall", "html", "truncate", "noai")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "shapes.parquet"
HTML_BODY = b"<!doctype html><html><head><title>Not an image</title></head><body>hello</body></html>\n"


def image_url(base_url: str, path: str, fault: str | None = None) -> str:
    """URL of ``path`` (relative to the served folder) on ``base_url``, optionally with a fault."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
    quoted = quote(path.lstrip("/"), safe="/?=&")  # a query string passes through (the server ignores it)
    prefix = f"{FAULT_PREFIX}/{fault}/" if fault else ""
    return f"{base_url.rstrip('/')}/{prefix}{quoted}"


class _Handler(BaseHTTPRequestHandler):
    """Serves files of ``server.directory`` and the faults listed in the module docstring."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """No request logging."""

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        fault, rel_path = self._split_fault(unquote(urlsplit(self.path).path).lstrip("/"))
        if fault == "404":
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        if fault == "500":
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)
            return
        file = self._resolve(rel_path)
        if file is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        body = file.read_bytes()
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        headers: dict[str, str] = {}
        if fault == "html":
            body, content_type = HTML_BODY, "text/html; charset=utf-8"
        elif fault == "truncate":
            body = body[: len(body) // 2]
        elif fault == "noai":
            headers["X-Robots-Tag"] = "noai"
        self._send_headers(content_type, len(body), headers)
        if fault == "stall":
            self.wfile.flush()
            if self.server.stopping.wait(self.server.stall_seconds):
                return  # server stopping: drop the connection without a body
        if send_body:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                self.wfile.write(body)

    def _split_fault(self, path: str) -> tuple[str | None, str]:
        parts = path.split("/", 2)
        if parts[0] != FAULT_PREFIX:
            return None, path
        if len(parts) < 3 or parts[1] not in FAULTS:
            return "404", path
        return parts[1], parts[2]

    def _resolve(self, rel_path: str) -> Path | None:
        root = self.server.directory
        file = (root / rel_path).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            return None
        return file

    def _send_headers(self, content_type: str, length: int, extra: dict[str, str]) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # stalled handlers never block stop() or interpreter exit
    request_queue_size = 256  # many downloader threads connect at once
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], directory: Path, stall_seconds: float) -> None:
        self.directory = directory
        self.stall_seconds = stall_seconds
        self.stopping = threading.Event()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet on clients that hang up (timeouts are what the faults are for)."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class ImageServer:
    """Serve ``directory`` over HTTP on ``host:port`` (a free port when 0) from a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    ``stall_seconds`` is how long the ``stall`` fault holds back the body.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        stall_seconds: float = 30.0,
    ) -> None:
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise ValueError(f"directory to serve does not exist or is not a folder: {str(directory)!r}")
        if stall_seconds < 0:
            raise ValueError(f"stall_seconds must be >= 0, got {stall_seconds}")
        self.host = host
        self.port = port
        self.stall_seconds = stall_seconds
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("ImageServer is not running; call start() or use it in a with block")
        return f"http://{self.host}:{self.port}"

    def url_for(self, path: str, fault: str | None = None) -> str:
        """URL of ``path`` (relative to the served folder), optionally behind one of :data:`FAULTS`."""
        return image_url(self.base_url, path, fault)

    def start(self) -> ImageServer:
        """Bind and start serving; returns self. Starting a running server is an error."""
        if self._httpd is not None:
            raise RuntimeError(f"ImageServer already running at {self.base_url}")
        self._httpd = _Server((self.host, self.port), self.directory, self.stall_seconds)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="image-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; wakes stalled handlers. Safe to call twice."""
        if self._httpd is None:
            return
        self._httpd.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd, self._thread = None, None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _base_url(server_or_base_url: ImageServer | str) -> str:
    return server_or_base_url.base_url if isinstance(server_or_base_url, ImageServer) else server_or_base_url


def write_url_list(
    server_or_base_url: ImageServer | str,
    files: list[str],
    captions: list[str | None],
    out_path: str,
    extra: dict[str, list | pa.Array | pa.ChunkedArray] | None = None,
) -> WrittenFile:
    """Write a ``sources`` Parquet file (url, caption, ``extra`` columns) for ``files`` on the server.

    ``files`` are paths relative to the served folder; a path may itself
    start with ``_fault/<kind>/`` to ask for a fault. Every list must have one
    entry per file. ``out_path`` may be any fsspec URL; it is written atomically.
    """
    base_url = _base_url(server_or_base_url)
    if len(captions) != len(files):
        raise ValueError(f"captions has {len(captions)} entries, expected one per file ({len(files)})")
    columns: dict[str, Any] = {
        "url": pa.array([image_url(base_url, f) for f in files], pa.string()),
        "caption": pa.array(captions, pa.string()),
    }
    for name, values in (extra or {}).items():
        if name in columns:
            raise ValueError(f"extra column {name!r} clashes with a sources column (url, caption)")
        if len(values) != len(files):
            raise ValueError(f"extra column {name!r} has {len(values)} entries, expected {len(files)}")
        columns[name] = values
    return write_parquet_atomic(pa.table(columns), out_path, sources_schema)


def url_list_for_folder(
    server_or_base_url: ImageServer | str, out_path: str, folder: str | os.PathLike[str] | None = None
) -> WrittenFile:
    """Write a ``sources`` URL list of every image in ``folder`` (default: the folder the server serves).

    ``folder`` must be the folder the server serves: URLs are its files'
    paths relative to it. If it holds a ``shapes.parquet`` (columns ``file``,
    relative paths, and ``caption``; the synthetic shapes set), its rows are
    used: their captions, and every other column (split, objects, …) as extra
    columns. Otherwise all image files are listed in name order, uncaptioned.
    """
    if folder is None:
        if not isinstance(server_or_base_url, ImageServer):
            raise ValueError("folder is required when a base URL (not an ImageServer) is given")
        folder = server_or_base_url.directory
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder does not exist or is not a directory: {str(folder)!r}")
    metadata = root / METADATA_FILE
    if metadata.is_file():
        table = pq.read_table(metadata)
        missing = [c for c in ("file", "caption") if c not in table.column_names]
        if missing:
            raise ValueError(f"{metadata} lacks column(s) {missing}; columns: {table.column_names}")
        extra = {c: table.column(c) for c in table.column_names if c not in ("file", "caption", "url")}
        files = table.column("file").to_pylist()
        return write_url_list(server_or_base_url, files, table.column("caption").to_pylist(), out_path, extra)
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return write_url_list(server_or_base_url, files, [None] * len(files), out_path)
