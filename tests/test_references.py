"""``dori references`` against a local HTTP server serving good, missing, slow, truncated, flaky and
non-image responses: what is kept, what is reported, what a rerun does."""

from __future__ import annotations

import csv
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dori.cli import app
from dori.references import FetchConfig, fetch_references


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class Server:
    """Serves /good, /good2, /missing (404), /slow (longer than the timeout), /truncated (a cut PNG with
    the full Content-Length), /cut (a PNG cut short, honest length), /html, /flaky (503 once, then
    the image), /gone (500 always); counts the requests per path."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.images = {"/good": _png(0), "/good2": _png(1), "/flaky": _png(2)}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                outer.hits[path] = outer.hits.get(path, 0) + 1
                if path in ("/good", "/good2") or (path == "/flaky" and outer.hits[path] > 1):
                    return self._send(200, outer.images[path], "image/png")
                if path == "/flaky":
                    return self._send(503, b"busy", "text/plain")
                if path == "/gone":
                    return self._send(500, b"error", "text/plain")
                if path == "/slow":
                    time.sleep(1.5)
                    return self._send(200, outer.images["/good"], "image/png")
                if path == "/truncated":
                    data = outer.images["/good"]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return None
                if path == "/cut":
                    return self._send(200, outer.images["/good"][:-40], "image/png")
                if path == "/html":
                    return self._send(200, b"<html><body>This image is no longer available</body></html>", "text/html")
                return self._send(404, b"not found", "text/plain")

            def _send(self, code, body, kind):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out closed the socket
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _prompts(tmp_path, server) -> str:
    paths = ["good", "good2", "missing", "slow", "truncated", "cut", "html", "flaky", "gone"]
    file = tmp_path / "prompts.csv"
    file.write_text("id,prompt,url\n" + "".join(f"{p},a photo {p},{server.url}/{p}\n" for p in paths) + "none,no url,\n")
    return str(file)


def test_fetch_sorts_every_kind_of_link_and_resumes(tmp_path, server):
    config = FetchConfig(prompts=_prompts(tmp_path, server), workers=4, retries=1, timeout=0.5, backoff=0.05)
    result = fetch_references(config, tmp_path / "refs")
    status = {row.id: row.status for row in result.rows}
    assert status == {"good": "ok", "good2": "ok", "missing": "dead", "slow": "timeout", "truncated": "truncated",
                      "cut": "truncated", "html": "not-an-image", "flaky": "ok", "gone": "failed", "none": "no-url"}
    by_id = {row.id: row for row in result.rows}
    assert by_id["flaky"].attempts == 2 and by_id["gone"].attempts == 2 and by_id["missing"].attempts == 1
    assert by_id["missing"].http_status == 404 and by_id["good"].width == 20 and by_id["good"].height == 12
    kept = sorted(p.name for p in (tmp_path / "refs").iterdir())
    assert kept == ["flaky.png", "good.png", "good2.png", "references.csv"]  # only complete, decodable images
    assert (tmp_path / "refs" / "good.png").read_bytes() == server.images["/good"]
    table = list(csv.DictReader(open(tmp_path / "refs" / "references.csv")))
    assert [r["id"] for r in table][:3] == ["good", "good2", "missing"] and table[2]["status"] == "dead"
    # the folder is what --references takes
    from dori.prompts import load_reference_folder

    assert load_reference_folder(tmp_path / "refs", ["good", "flaky"])["good"].shape == (12, 20, 3)
    # a rerun keeps what it has and asks the server only for what failed
    hits = dict(server.hits)
    again = fetch_references(config, tmp_path / "refs")
    assert {row.id: row.status for row in again.rows if row.status == "kept"}.keys() == {"good", "good2", "flaky"}
    assert server.hits["/good"] == hits["/good"] and server.hits["/missing"] == hits["/missing"] + 1
    # refresh: the server now serves other bytes for /good2
    server.images["/good2"] = _png(9)
    refreshed = {row.id: row.status for row in fetch_references(FetchConfig(**{**config.__dict__, "refresh": True}),
                                                                tmp_path / "refs").rows}
    assert refreshed["good2"] == "changed" and refreshed["good"] == "kept"
    assert (tmp_path / "refs" / "good2.png").read_bytes() == server.images["/good2"]


def test_cli_reports_usable_images_and_bad_input(tmp_path, server):
    runner = CliRunner()
    result = runner.invoke(app, ["references", "--prompts", _prompts(tmp_path, server), "--out", str(tmp_path / "r"),
                                 "--timeout", "0.5", "--retries", "0"])
    assert result.exit_code == 0, result.output
    assert "2 of 10 images usable" in result.output  # good, good2 (flaky needs a retry)
    no_urls = tmp_path / "plain.txt"
    no_urls.write_text("a cat\n")
    bad = runner.invoke(app, ["references", "--prompts", str(no_urls), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "url column" in bad.output
