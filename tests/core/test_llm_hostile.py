"""The LLM client against hostile servers on 127.0.0.1: trickling, huge, redirecting, long answers."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from ovseg_ros.core.llm_text import (
    MAX_ANSWER_CHARS,
    EndpointError,
    LLMConfig,
    LLMTextClient,
    clean_answer,
    post_json,
)


class HostileServer:
    """Loopback HTTP server; ``mode`` picks the misbehaviour. Records the headers of every request."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.answer = "a seat"
        self.seen: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.seen.append((self.path, dict(self.headers)))
                try:
                    self._answer()
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client hung up, as it should

            def _answer(self) -> None:
                mode = server.mode
                if mode == "redirect" and self.path != "/elsewhere":
                    self.send_response(307)
                    self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"choices": [{"message": {"content": server.answer}}]}).encode()
                if mode == "huge":
                    body = b'{"choices": [{"message": {"content": "' + b"x" * (8 << 20) + b'"}}]}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if mode != "huge_chunked":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "trickle":
                    for byte in body:  # one byte every 50 ms: each read is quick, the whole is not
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.05)
                elif mode == "huge_chunked":
                    for _ in range(4096):
                        self.wfile.write(b"x" * 4096)
                else:
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[HostileServer]:
    s = HostileServer()
    yield s
    s.close()


def test_trickling_server_is_cut_at_the_total_deadline(server: HostileServer) -> None:
    server.mode = "trickle"
    client = LLMTextClient(LLMConfig(endpoint=server.url, timeout_s=0.5))
    t0 = time.monotonic()
    assert client.get("chair", "definition") is None
    assert time.monotonic() - t0 < 1.5  # the body alone takes > 3 s to trickle
    assert client.stats["failures"] == 1


@pytest.mark.parametrize("mode", ["huge", "huge_chunked"])
def test_huge_body_is_refused(server: HostileServer, mode: str) -> None:
    server.mode = mode
    with pytest.raises(EndpointError, match="larger than"):
        post_json(server.url + "/v1/chat/completions", b"{}", {}, 5.0, 64 * 1024)


def test_redirect_is_not_followed_and_token_not_resent(server: HostileServer, monkeypatch) -> None:
    server.mode = "redirect"
    monkeypatch.setenv("OVSEG_TEST_TOKEN", "secret")
    client = LLMTextClient(LLMConfig(endpoint=server.url, api_key_env="OVSEG_TEST_TOKEN", timeout_s=2))
    assert client.get("chair", "definition") is None
    assert [path for path, _ in server.seen] == ["/v1/chat/completions"]  # /elsewhere never asked
    with pytest.raises(EndpointError, match="HTTP 307 .redirects are not followed"):
        post_json(server.url + "/v1/chat/completions", b"{}", {}, 2.0, 1024)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "127.0.0.1:8080"])
def test_only_http_urls(url: str) -> None:
    with pytest.raises(EndpointError, match="http:// or https://"):
        post_json(url, b"{}", {}, 1.0, 1024)


def test_long_answer_is_trimmed_before_caching(server: HostileServer, tmp_path: Path) -> None:
    server.answer = " ".join(["word"] * 20000)
    client = LLMTextClient(LLMConfig(endpoint=server.url, max_words=30, max_body_bytes=1 << 20), tmp_path)
    t0 = time.monotonic()
    answer = client.get("chair", "definition")
    assert answer is not None and len(answer.split()) == 30 and time.monotonic() - t0 < 2
    [cache] = list(tmp_path.rglob("*.json"))
    assert all(len(v.split()) <= 30 for v in json.loads(cache.read_text())["answers"].values())


def test_clean_answer_bounds_are_linear() -> None:
    text = "x" * 2_000_000
    t0 = time.monotonic()
    assert len(clean_answer(text, "definition", 30)) <= MAX_ANSWER_CHARS
    assert len(clean_answer("a " * 100_000, "synonym").split()) <= 8
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"answers": [1]}', b"\xff\xfe", b'{"answers": {"k": 3}}'])
def test_malformed_cache_file_is_ignored_with_a_warning(tmp_path: Path, content: bytes, caplog) -> None:
    cfg = LLMConfig(endpoint="http://127.0.0.1:9", timeout_s=0.2)
    client = LLMTextClient(cfg, tmp_path)  # learn where its file lives
    assert client._file is not None
    client._file.parent.mkdir(parents=True, exist_ok=True)
    client._file.write_bytes(content)
    caplog.set_level("WARNING")
    again = LLMTextClient(cfg, tmp_path)
    assert again._cache == {}
    if content != b'{"answers": {"k": 3}}':  # a well-formed file with a foreign entry is filtered silently
        assert "malformed" in caplog.text


def test_cached_entries_are_trimmed_on_read(tmp_path: Path) -> None:
    cfg = LLMConfig(endpoint="http://127.0.0.1:9", timeout_s=0.2, max_words=5)
    client = LLMTextClient(cfg, tmp_path)
    assert client._file is not None
    client._file.parent.mkdir(parents=True, exist_ok=True)
    client._file.write_text(json.dumps({"answers": {"definition\x1fchair": "one two three four five six seven"}}))
    assert LLMTextClient(cfg, tmp_path).get("chair", "definition") == "one two three four five"
