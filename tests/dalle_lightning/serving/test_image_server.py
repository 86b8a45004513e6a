"""ImageServer: files served on loopback, each fault, clean stop; URL lists written against ``sources``."""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_schemas.sources as sources_schema
from dalle_lightning.serving.image_server import (
    FAULTS,
    ImageServer,
    image_url,
    url_list_for_folder,
    write_url_list,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _png(path: Path, size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.read_bytes()


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def served(tmp_path: Path):
    data = _png(tmp_path / "www" / "images" / "a b.png")
    (tmp_path / "secret.txt").write_text("not served")
    with ImageServer(tmp_path / "www", stall_seconds=5) as server:
        yield server, data


def test_serves_file_bytes_on_loopback(served) -> None:
    server, data = served
    assert server.base_url.startswith("http://127.0.0.1:")
    status, headers, body = _get(server.url_for("images/a b.png"))
    assert (status, headers["Content-Type"], body) == (200, "image/png", data)


def test_missing_and_escaping_paths_are_404(served) -> None:
    server, _ = served
    assert _get(server.url_for("images/nope.png"))[0] == 404
    assert _get(f"{server.base_url}/_fault/bogus/images/a%20b.png")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/../secret.txt")  # sent verbatim, not normalised by the client
    assert conn.getresponse().status == 404
    conn.close()


@pytest.mark.parametrize("fault, status", [("404", 404), ("500", 500)])
def test_error_faults(served, fault: str, status: int) -> None:
    server, _ = served
    assert _get(server.url_for("images/a b.png", fault=fault))[0] == status


def test_html_fault_is_a_page_not_an_image(served) -> None:
    server, _ = served
    status, headers, body = _get(server.url_for("images/a b.png", fault="html"))
    assert (
        status == 200
        and headers["Content-Type"].startswith("text/html")
        and body.startswith(b"<!doctype html>")
    )


def test_truncate_fault_sends_first_half(served) -> None:
    server, data = served
    status, headers, body = _get(server.url_for("images/a b.png", fault="truncate"))
    assert (status, headers["Content-Type"], body) == (200, "image/png", data[: len(data) // 2])


def test_noai_fault_sets_robots_header(served) -> None:
    server, data = served
    status, headers, body = _get(server.url_for("images/a b.png", fault="noai"))
    assert (status, headers["X-Robots-Tag"], body) == (200, "noai", data)


def test_stall_times_the_client_out_and_stop_does_not_hang(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    server = ImageServer(tmp_path, stall_seconds=30).start()
    with urllib.request.urlopen(server.url_for("x.png", fault="stall"), timeout=0.5) as r:
        assert r.status == 200  # headers arrive at once ...
        with pytest.raises((TimeoutError, socket.timeout)):
            r.read()  # ... the body does not
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 2.0
    assert not server.running
    server.stop()  # idempotent


def test_stall_sends_body_after_stall_seconds(tmp_path: Path) -> None:
    data = _png(tmp_path / "x.png")
    with ImageServer(tmp_path, stall_seconds=0.3) as server:
        assert _get(server.url_for("x.png", fault="stall"))[2] == data


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        ImageServer(tmp_path / "missing")
    server = ImageServer(tmp_path)
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.base_url
    with pytest.raises(ValueError, match="unknown fault"):
        image_url("http://127.0.0.1:1", "x.png", fault="slow")
    assert set(FAULTS) == {"404", "500", "stall", "html", "truncate", "noai"}


def test_write_url_list(tmp_path: Path) -> None:
    out = str(tmp_path / "urls" / "list.parquet")
    written = write_url_list(
        "http://127.0.0.1:9",
        ["a.png", "_fault/404/b c.png"],
        ["an a", None],
        out,
        extra={"split": ["train", "val"]},
    )
    table = pq.read_table(out)
    sources_schema.validate(table, check_metadata=True)
    assert written.rows == 2
    assert table.column("url").to_pylist() == [
        "http://127.0.0.1:9/a.png",
        "http://127.0.0.1:9/_fault/404/b%20c.png",
    ]
    assert table.column("caption").to_pylist() == ["an a", None]
    assert table.column("split").to_pylist() == ["train", "val"]
    with pytest.raises(ValueError, match="captions has 1"):
        write_url_list("http://h", ["a.png", "b.png"], ["x"], out)
    with pytest.raises(ValueError, match="extra column 'split' has 1"):
        write_url_list("http://h", ["a.png", "b.png"], ["x", "y"], out, extra={"split": ["train"]})


def test_url_list_for_folder_lists_images(tmp_path: Path) -> None:
    _png(tmp_path / "www" / "b.png")
    _png(tmp_path / "www" / "sub" / "a.jpg")
    (tmp_path / "www" / "notes.txt").write_text("skip me")
    with ImageServer(tmp_path / "www") as server:
        url_list_for_folder(server, str(tmp_path / "list.parquet"))
        table = pq.read_table(tmp_path / "list.parquet")
        assert table.column("url").to_pylist() == [server.url_for("b.png"), server.url_for("sub/a.jpg")]
        assert _get(table.column("url")[1].as_py())[0] == 200
    assert table.column("caption").null_count == 2


def test_url_list_for_folder_uses_shapes_metadata(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    for i in range(2):
        _png(root / "images" / f"{i}.png")
    objects = pa.array([[{"shape": "circle"}], [{"shape": "square"}, {"shape": "circle"}]])
    meta = pa.table(
        {
            "id": ["0", "1"],
            "file": ["images/0.png", "images/1.png"],
            "caption": ["a red circle", "a square above a circle"],
            "split": ["train", "test"],
            "objects": objects,
            "relation": [None, "above"],
        }
    )
    pq.write_table(meta, root / "shapes.parquet")
    url_list_for_folder("http://127.0.0.1:8000", str(tmp_path / "list.parquet"), folder=root)
    table = pq.read_table(tmp_path / "list.parquet")
    sources_schema.validate(table, check_metadata=True)
    assert table.column("url").to_pylist() == [
        "http://127.0.0.1:8000/images/0.png",
        "http://127.0.0.1:8000/images/1.png",
    ]
    assert table.column("caption").to_pylist() == ["a red circle", "a square above a circle"]
    assert table.column("split").to_pylist() == ["train", "test"]
    assert table.column("objects").to_pylist() == objects.to_pylist()
    assert set(table.column_names) == {"url", "caption", "id", "split", "objects", "relation"}


def test_url_list_for_folder_needs_a_folder_for_a_bare_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="folder is required"):
        url_list_for_folder("http://127.0.0.1:8000", str(tmp_path / "l.parquet"))
    with pytest.raises(ValueError, match="no image files"):
        url_list_for_folder("http://127.0.0.1:8000", str(tmp_path / "l.parquet"), folder=tmp_path)
