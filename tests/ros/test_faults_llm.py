"""Fault injection (issue 9, item 7): an ITACLIP node whose LLM endpoint misbehaves.

The node (tiny random CLIP) asks an OpenAI-compatible endpoint for class definitions; here the endpoint is
a hostile server in this test process on 127.0.0.1: it trickles its answer one byte at a time, answers
20 MB, or redirects to another server. ``~/set_vocabulary`` must still be answered in bounded time (the
class then has no definition, or the change is refused with the reason), memory must stay bounded, the
bearer token must never follow a redirect, and get_state must keep answering within 1 s throughout.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import threading
import time
from typing import Any, Iterator

import pytest
from fault_harness import Restartable, StateProbe, Target, rss_peak_mib
from ros_harness import RosClient, require_ros_or_skip

require_ros_or_skip()

TOKEN_ENV = "OVSEG_FAULT_LLM_TOKEN"
TOKEN = "fault-test-secret-token"
_names = itertools.count(1)


class Hostile:
    """Two loopback HTTP servers: ``main`` (the configured endpoint, behaving as ``mode`` says) and
    ``other`` (where ``main`` redirects; it records the headers it gets)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.seen_by_other: list[dict[str, str]] = []
        self.stop = threading.Event()
        hostile = self

        class Main(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                if hostile.mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{hostile.other.server_port}/v1/chat/completions")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif hostile.mode == "trickle":
                    body = _answer("a thing")
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body) + 100000))
                    self.end_headers()
                    deadline = time.monotonic() + 40.0
                    while time.monotonic() < deadline and hostile.mode == "trickle" and not hostile.stop.is_set():
                        try:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.5)
                elif hostile.mode == "huge":
                    words = b"word " * (20_000_000 // 5)
                    body = b'{"choices": [{"message": {"role": "assistant", "content": "' + words + b'"}}]}'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        self.wfile.write(body)
                    except OSError:
                        return
                else:
                    body = _answer("a small object")
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        class Other(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                hostile.seen_by_other.append({k.lower(): v for k, v in self.headers.items()})
                body = _answer("a redirected answer")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any  # noqa: N815

        self.main = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Main)
        self.other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
        for srv in (self.main, self.other):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        for srv in (self.main, self.other):
            srv.shutdown()
            srv.server_close()


def _answer(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    h = Hostile()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def shared(client: RosClient, namespace: str, fast_params: dict, hostile: Hostile,
           tmp_path_factory: Any) -> Iterator[Restartable]:
    opts = {"short_side": 64, "slide_crop": 64, "slide_stride": 64, "templates": "photo", "pamr_steps": 1,
            "aux_kind": "definition",
            "llm": {"endpoint": f"http://127.0.0.1:{hostile.main.server_port}", "api_key_env": TOKEN_ENV,
                    "timeout_s": 2.0, "retry_after_s": 0.0}}
    params = {**fast_params, "segmenter": "itaclip", "segmenter_options": json.dumps(opts)}
    old = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN  # the node inherits it (NodeProcess passes the environment)
    r = Restartable(client, f"{namespace}_llm", params, tmp_path_factory.mktemp("faults_llm"), color_key_options=None)
    try:
        yield r
    finally:
        r.close()
        if old is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = old


@pytest.fixture
def node(shared: Restartable, hostile: Hostile) -> Iterator[Target]:
    hostile.mode = "ok"
    t = shared.get()
    resp = t.set_vocabulary_when_free(["floor", "chair"])  # not busy with an earlier change
    assert resp.success, resp.message
    t.checker.learn(int(resp.revision), ("floor", "chair"))
    yield t
    hostile.mode = "ok"


def _change(node: Target, bound_s: float) -> tuple[Any, float]:
    """A vocabulary change with a class the endpoint has not answered yet; (answer, seconds)."""
    classes = ["floor", f"zorblax {next(_names)}"]
    with StateProbe(node) as probe:
        t0 = time.monotonic()
        fut, done = node.set_vocabulary_async(classes)
        answered = done.wait(bound_s)
        took = time.monotonic() - t0
    probe.check()
    assert answered, f"set_vocabulary not answered within {bound_s} s with a hostile LLM endpoint\n{node.tail()}"
    resp = fut.result()
    assert resp.success or resp.message.strip(), "refused without a reason"
    if resp.success:
        node.checker.learn(int(resp.revision), tuple(c.split(",")[0] for c in classes))
    return resp, took


def test_bearer_token_does_not_follow_a_redirect(node: Target, hostile: Hostile) -> None:
    hostile.mode = "redirect"
    hostile.seen_by_other.clear()
    _change(node, 20.0)
    leaked = [h for h in hostile.seen_by_other if TOKEN in h.get("authorization", "")]
    assert not leaked, "the bearer token was sent to the redirect target"
    node.assert_healthy()


def test_trickling_endpoint_is_bounded_in_total_time(node: Target, hostile: Hostile) -> None:
    hostile.mode = "trickle"
    _change(node, 15.0)  # the per-read timeout (2 s) never fires on a trickle: the bound must be total
    node.assert_healthy()


def test_malformed_llm_cache_file_is_ignored(node: Target, hostile: Hostile, tmp_path: Any) -> None:
    """Item 11: a malformed LLM answer cache must not fail configure; it is ignored (and rewritten)."""
    cache = tmp_path / "cache"
    try:
        assert node.transition("deactivate") and node.transition("cleanup")
        assert all(r.successful for r in node.set_params({"cache_dir": str(cache)}))
        assert node.transition("configure", timeout=120.0) and node.transition("activate")
        resp, _ = _change(node, 20.0)
        assert resp.success, resp.message
        files = list((cache / "llm_text").glob("*.json"))
        assert files, "the LLM answers were not cached; the test cannot corrupt the cache"
        for f in files:
            f.write_text('{"answers": ["not", "a", "mapping"]}')
        assert node.transition("deactivate") and node.transition("cleanup")
        assert node.transition("configure", timeout=120.0), f"a malformed LLM cache failed configure\n{node.tail()}"
        assert node.transition("activate")
        _change(node, 20.0)
    finally:
        if node.proc.alive():
            if node.state(10.0) == "active":
                node.transition("deactivate")
            if node.state(10.0) == "inactive":
                node.transition("cleanup")
            node.set_params({"cache_dir": ""})
            node.bring_active()
    node.assert_healthy()


def test_huge_answer_is_bounded_in_size_and_time(node: Target, hostile: Hostile) -> None:
    hostile.mode = "huge"
    peak0 = rss_peak_mib(node.proc.pid)
    _change(node, 20.0)
    grew = rss_peak_mib(node.proc.pid) - peak0
    assert grew < 150, f"peak memory grew by {grew:.0f} MiB on a 20 MB answer"
    node.assert_healthy()
