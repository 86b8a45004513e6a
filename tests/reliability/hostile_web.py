"""The hostile web of the bad-input corpus: a loopback HTTP server with one misbehaviour per path.

A helper module of ``tests/reliability`` (the tests put this folder on ``sys.path``).

:class:`HostileServer` is a :class:`~http.server.ThreadingHTTPServer` bound to
127.0.0.1 on a free port. Each path is a :class:`Route`: a status code, a
redirect, a body (built in memory with PIL by the helpers below) with chosen
headers, a connection reset, a body cut short, or a stall longer than the
download timeout. Nothing is read from or written to disk by the server.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

STALL_SECONDS = 5.0
"""How long a stalled response waits before its body; far past the tests' download timeout."""


@dataclass(frozen=True)
class Route:
    """What the server does for one path."""

    status: int = 200
    body: bytes = b""
    content_type: str = "image/png"
    headers: tuple[tuple[str, str], ...] = ()
    action: str = "respond"
    """``respond`` (``status`` with ``body`` and ``headers``; an error page for a status other than 200),
    ``redirect`` (``status`` and ``headers``, no body), ``redirect_loop`` (302 to itself), ``reset`` (RST
    before any byte), ``cut`` (headers and half the body, then close), ``stall`` (headers, then the
    body only after :data:`STALL_SECONDS`) or ``unannounced`` (the body with no ``Content-Length``, ended
    by closing the connection)."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """No request logging."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        self.server.hits[path] = self.server.hits.get(path, 0) + 1
        if route is None:
            self.send_error(404)
            return
        if route.action == "reset":
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if route.action == "redirect_loop":
            self.send_response(302)
            self.send_header("Location", path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.action == "redirect":
            self.send_response(route.status)
            for name, value in route.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.status != 200:
            self.send_error(route.status)
            return
        self.send_response(200)
        self.send_header("Content-Type", route.content_type)
        if route.action == "unannounced":
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(route.body)))
        for name, value in route.headers:
            self.send_header(name, value)
        self.end_headers()
        body = route.body
        if route.action == "cut":
            body = body[: len(body) // 2]
            self.close_connection = True
        elif route.action == "stall":
            self.wfile.flush()
            if self.server.stopping.wait(STALL_SECONDS):
                self.close_connection = True
                return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)
            self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, routes: dict[str, Route]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.hits: dict[str, int] = {}
        self.stopping = threading.Event()


@dataclass
class HostileServer:
    """A running :class:`_Server`; ``url(path)`` gives the full URL, ``hits`` counts requests per path."""

    routes: dict[str, Route] = field(default_factory=dict)

    def __enter__(self) -> HostileServer:
        self._server = _Server(self.routes)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def hits(self) -> dict[str, int]:
        return self._server.hits

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"


# ---------------------------------------------------------------- image bodies, built in memory


def texture(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (distinct per seed, so dedup keeps each)."""
    cells = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def jpeg(image: Image.Image, **params: object) -> bytes:
    return encode(image, "JPEG", quality=92, **params)


def corrupt_png(image: Image.Image) -> bytes:
    """A PNG whose image data is garbled (the IDAT chunk's CRC no longer matches, the stream is not zlib)."""
    data = bytearray(png(image))
    start = data.index(b"IDAT") + 4
    for i in range(start + 2, start + 40):
        data[i] ^= 0x5A
    return bytes(data)


def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width``×``height`` pixels that compresses to a few kilobytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def exif_rotated_jpeg(width: int, height: int) -> bytes:
    """A ``width``×``height`` JPEG whose EXIF orientation (6: rotate 90° clockwise) makes it display upright
    as ``height``×``width``; the left half is red, the right half blue as stored."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (220, 30, 30)
    pixels[:, width // 2 :] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(Image.fromarray(pixels), exif=exif.tobytes())
