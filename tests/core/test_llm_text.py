"""The OpenAI-compatible definition/synonym client, against a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from ovseg_ros.core.llm_text import LLMConfig, LLMTextClient, chat_url, clean_answer


class FakeChatServer:
    """A chat-completions server on 127.0.0.1 whose behaviour the test sets (``mode``)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.answer = "a piece of furniture for sitting"
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                server.headers.append(dict(self.headers))
                if server.mode == "error":
                    self.send_error(500, "boom")
                    return
                if server.mode == "slow":
                    time.sleep(1.0)
                if server.mode == "garbage":
                    payload = b"not json"
                else:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                   "content": server.answer}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def chat_server() -> Iterator[FakeChatServer]:
    server = FakeChatServer()
    yield server
    server.close()


def test_chat_url_forms() -> None:
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_clean_answer() -> None:
    assert clean_answer('  "Definition: a four-legged seat."\nmore', "definition") == "a four-legged seat."
    assert clean_answer("<think>hmm</think>\n- Sofa, couch.", "synonym") == "Sofa"
    assert clean_answer("1. automobile", "synonym") == "automobile"


def test_asks_once_and_caches_on_disk(chat_server: FakeChatServer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_LLM_KEY", "secret-token")
    cfg = LLMConfig(endpoint=chat_server.url, model="local-llm", api_key_env="TEST_LLM_KEY", timeout_s=5)
    client = LLMTextClient(cfg, tmp_path)
    assert client.get("chair", "definition") == "a piece of furniture for sitting"
    assert client.get("Chair ", "definition") == "a piece of furniture for sitting"  # same class, cached
    assert len(chat_server.requests) == 1
    req = chat_server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "local-llm"
    assert "chair" in req["messages"][-1]["content"]
    assert chat_server.headers[0]["Authorization"] == "Bearer secret-token"
    chat_server.close()  # a new process with the same cache needs no server
    again = LLMTextClient(cfg, tmp_path)
    assert again.get("chair", "definition") == "a piece of furniture for sitting"
    assert again.stats["requests"] == 0


def test_synonym_kind_uses_its_own_prompt(chat_server: FakeChatServer) -> None:
    chat_server.answer = "Automobile, car."
    client = LLMTextClient(LLMConfig(endpoint=chat_server.url + "/v1"))
    assert client.get("car", "synonym") == "Automobile"
    assert "synonym" in chat_server.requests[0]["messages"][-1]["content"]
    with pytest.raises(ValueError):
        client.get("car", "poem")


@pytest.mark.parametrize("mode", ["error", "garbage"])
def test_failures_give_none_and_back_off(chat_server: FakeChatServer, mode: str, tmp_path) -> None:
    chat_server.mode = mode
    client = LLMTextClient(LLMConfig(endpoint=chat_server.url, retry_after_s=60), tmp_path)
    assert client.get("chair", "definition") is None
    assert client.get("table", "definition") is None  # endpoint marked down: not asked again
    assert len(chat_server.requests) == 1 and client.stats["failures"] == 1
    assert not list(tmp_path.rglob("*.json"))  # failures are not cached


def test_timeout_gives_none(chat_server: FakeChatServer) -> None:
    chat_server.mode = "slow"
    client = LLMTextClient(LLMConfig(endpoint=chat_server.url, timeout_s=0.2))
    t0 = time.monotonic()
    assert client.get("chair", "definition") is None
    assert time.monotonic() - t0 < 0.9


def test_unreachable_endpoint_and_disabled_client() -> None:
    assert LLMTextClient(LLMConfig(endpoint="http://127.0.0.1:9", timeout_s=0.5)).get("cup", "definition") is None
    assert LLMTextClient(LLMConfig()).get("cup", "definition") is None
