"""Class definitions and synonyms from an OpenAI-compatible chat endpoint, cached on disk.

ITACLIP fuses each class name's text embedding with the embedding of an LLM-written definition or
synonym. The authors generated those texts offline with Llama-3-8B-Instruct; on a robot the vocabulary
arrives at run time, so we ask a server the user runs (llama.cpp, vLLM, Ollama, ... any server that
implements ``POST /v1/chat/completions``) once per new class, and keep the answer on disk.

Design rules:

* Only the standard library (``urllib``): no client package to install on the robot.
* Never in the frame path: the segmenter calls this from ``encode_vocabulary`` (the service thread).
* Failures never break a vocabulary change: any error is logged and the class gets no auxiliary text.
  After a failure the endpoint is not asked again for ``retry_after_s`` seconds, so a dead server costs
  at most one timeout per vocabulary change, not one per class.
* Answers are cached per (endpoint, model, kind, prompt version) in one JSON file, written atomically;
  failures are not cached, so they are retried later. A malformed cache file is ignored with a warning.
* The server is not trusted: ``timeout_s`` bounds the *whole* request (connect, headers, body; a server
  trickling one byte per second is cut off), the body is bounded by ``max_body_bytes``, redirects are
  never followed (so a bearer token is never sent to another host), only http(s) URLs are used, and an
  answer is trimmed to ``max_words`` words and :data:`MAX_ANSWER_CHARS` characters, in one pass, before
  it is cached or used.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .untrusted import UntrustedInputError, atomic_write, read_text_file, short_repr

log = logging.getLogger(__name__)

#: Kinds of auxiliary text and the instruction sent for each ({name} is the class name).
PROMPTS: dict[str, str] = {
    "definition": (
        "Give a short visual definition of '{name}' as it appears in photographs, in one sentence of at "
        "most {max_words} words. Answer with the definition only."
    ),
    "synonym": (
        "Give one common synonym of '{name}' (a single word or a short noun phrase) that names the same "
        "thing in photographs. Answer with the synonym only."
    ),
}
#: Bump when the prompts change so old cached answers are not reused.
PROMPT_VERSION = 1
#: Longest answer kept (characters), whatever the server sends; synonyms keep at most this many words.
MAX_ANSWER_CHARS = 600
MAX_SYNONYM_WORDS = 8
#: Largest cache file read (a cache of 20000 answers is ~4 MB).
MAX_CACHE_FILE_BYTES = 32 << 20
_SYSTEM = "You write short, literal descriptions of visual categories for an image segmentation system."


@dataclass(frozen=True)
class LLMConfig:
    """Where to ask for auxiliary texts.

    Attributes:
        endpoint: base URL of the server (``http://127.0.0.1:8080`` or ``.../v1``; a URL ending in
            ``/chat/completions`` is used as is); "" disables the client.
        model: the ``model`` field of the request (servers with one model often ignore it).
        api_key_env: name of an environment variable holding a bearer token ("" = none); the key itself
            never goes into configs or logs.
        timeout_s: deadline of one whole request (connect, send, headers and body together).
        temperature, top_p: sampling settings (the authors used 0.6 / 0.9 with Llama-3-8B).
        max_words: length limit asked for definitions.
        retry_after_s: after a failure, skip the endpoint for this long.
        max_body_bytes: larger responses are refused (an answer of 30 words is well under 4 kB).
    """

    endpoint: str = ""
    model: str = ""
    api_key_env: str = ""
    timeout_s: float = 10.0
    temperature: float = 0.6
    top_p: float = 0.9
    max_words: int = 30
    retry_after_s: float = 60.0
    max_body_bytes: int = 64 * 1024

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint.strip())


def chat_url(endpoint: str) -> str:
    """The full ``/v1/chat/completions`` URL for a base URL."""
    url = endpoint.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def clean_answer(text: str, kind: str, max_words: int = 0) -> str:
    """Normalise a model answer: first line, no quotes or list markers, no 'Definition:' prefix; at most
    ``max_words`` words (0: no word limit; synonyms: :data:`MAX_SYNONYM_WORDS`) and :data:`MAX_ANSWER_CHARS`
    characters. Linear in the length of ``text``."""
    text = text.strip()
    text = re.sub(r"^<think>.*?</think>", "", text, flags=re.S).strip()  # reasoning models
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:[-*\u2022]|\d+[.)])\s*", "", line).strip("\"'` ")
    line = re.sub(r"^(?:definition|synonym|answer)\s*:\s*", "", line, flags=re.I)
    line = line.strip().strip("\"'`").strip()
    if kind == "synonym":
        line = line.split(",")[0].strip().rstrip(".").strip()
        max_words = min(max_words, MAX_SYNONYM_WORDS) if max_words else MAX_SYNONYM_WORDS
    words = line[: MAX_ANSWER_CHARS * 2].split()
    if max_words and len(words) > max_words:
        words = words[:max_words]
    line = " ".join(words)
    if len(line) > MAX_ANSWER_CHARS:
        line = line[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] if " " in line[:MAX_ANSWER_CHARS] else line[:MAX_ANSWER_CHARS]
    return line


class LLMTextClient:
    """Ask the endpoint for one auxiliary text per class name; cache answers in memory and on disk.

    Args:
        config: the endpoint settings.
        cache_dir: folder for the answer cache ("" keeps answers in memory only).
    """

    def __init__(self, config: LLMConfig, cache_dir: str | Path = "") -> None:
        self.config = config
        self._lock = threading.Lock()
        self._down_until = 0.0
        ident = f"{chat_url(config.endpoint)}|{config.model}|v{PROMPT_VERSION}|{config.max_words}"
        self._file: Optional[Path] = None
        if cache_dir:
            digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
            self._file = Path(cache_dir).expanduser() / "llm_text" / f"{digest}.json"
        self._cache: dict[str, str] = self._read_cache()
        self.stats = {"requests": 0, "failures": 0, "cache_hits": 0}

    # -- public -------------------------------------------------------------------------------------
    def get(self, name: str, kind: str) -> Optional[str]:
        """The ``kind`` text for class ``name``, or None when unavailable (never raises for I/O errors)."""
        if kind not in PROMPTS:
            raise ValueError(f"unknown auxiliary text kind {kind!r}; use one of {sorted(PROMPTS)}")
        if not self.config.enabled:
            return None
        key = f"{kind}\x1f{name.strip().lower()}"
        with self._lock:
            if key in self._cache:
                self.stats["cache_hits"] += 1
                return self._cache[key]
            if time.monotonic() < self._down_until:
                return None
        try:
            answer = self._ask(name, kind)
        except Exception as exc:  # network, HTTP, JSON and schema errors all mean "no text"
            with self._lock:
                self.stats["failures"] += 1
                self._down_until = time.monotonic() + self.config.retry_after_s
            log.warning("LLM endpoint %s failed for %r (%s); continuing without %s text; not retrying for %.0f s",
                        chat_url(self.config.endpoint), name, _short(exc), kind, self.config.retry_after_s)
            return None
        if not answer:
            log.warning("LLM endpoint gave an empty %s for %r; ignoring it", kind, name)
            return None
        with self._lock:
            self._cache[key] = answer
            self._write_cache()
        return answer

    # -- internals ----------------------------------------------------------------------------------
    def _ask(self, name: str, kind: str) -> str:
        cfg = self.config
        body = {
            "model": cfg.model or "default",
            "messages": [
                {"role": "system", "content": _SYSTEM},
                {"role": "user", "content": PROMPTS[kind].format(name=name, max_words=cfg.max_words)},
            ],
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": 4 * cfg.max_words + 16,
            "stream": False,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with self._lock:
            self.stats["requests"] += 1
        raw = post_json(chat_url(cfg.endpoint), json.dumps(body).encode(), headers, cfg.timeout_s,
                        cfg.max_body_bytes)
        return parse_chat_response(raw, kind, cfg.max_words)

    def _read_cache(self) -> dict[str, str]:
        """The answers of the cache file; a missing file is empty, a malformed one is ignored with a warning
        (configure must not fail on it; the next successful answer rewrites it)."""
        if self._file is None or not self._file.exists():
            return {}
        try:
            data = json.loads(read_text_file(self._file, "LLM text cache", max_bytes=MAX_CACHE_FILE_BYTES))
            answers = data["answers"]
            if not isinstance(answers, dict):
                raise ValueError("'answers' is not a mapping")
        except (UntrustedInputError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("LLM text cache %s is malformed (%s); ignoring it", self._file, short_repr(str(exc)))
            return {}
        out = {}
        for k, v in answers.items():
            if isinstance(k, str) and isinstance(v, str) and "\x1f" in k:
                kind = k.split("\x1f", 1)[0]
                text = clean_answer(v, kind, self.config.max_words) if kind in PROMPTS else ""
                if text:
                    out[k] = text
        return out

    def _write_cache(self) -> None:
        if self._file is None:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            doc = {"endpoint": chat_url(self.config.endpoint), "model": self.config.model,
                   "prompt_version": PROMPT_VERSION, "answers": self._cache}
            atomic_write(self._file, json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8"))
        except OSError as exc:
            log.warning("LLM text cache write failed (%s); answers kept in memory only", exc)


class EndpointError(RuntimeError):
    """The endpoint gave no usable answer (HTTP status, redirect, too large, too slow, malformed)."""


def parse_chat_response(raw: bytes, kind: str, max_words: int = 0) -> str:
    """The cleaned answer text of a chat-completions response body.

    Raises:
        EndpointError: not UTF-8 JSON, or no string at ``choices[0].message.content``.
    """
    try:
        payload = json.loads(raw.decode("utf-8"))
        content = payload["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
        raise EndpointError(f"malformed chat response ({type(exc).__name__})") from None
    if not isinstance(content, str):
        raise EndpointError(f"malformed chat response (content is {type(content).__name__}, not text)")
    return clean_answer(content, kind, max_words)


def post_json(url: str, body: bytes, headers: dict[str, str], timeout_s: float, max_body_bytes: int) -> bytes:
    """POST ``body`` to ``url`` and return the response body, with hard bounds.

    ``timeout_s`` is a deadline for the whole exchange, enforced by a watchdog that shuts the socket down
    (a per-read timeout alone lets a trickling server hold the caller forever). Redirects are not followed.

    Raises:
        EndpointError: non-http(s) URL, HTTP status other than 2xx (3xx included), body over
            ``max_body_bytes``, or the deadline passed. OSError / http.client errors: network failures.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointError(f"endpoint must be an http:// or https:// URL, got {short_repr(url)}")
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    deadline = time.monotonic() + timeout_s
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout_s)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread
            except OSError:
                pass

    watchdog = threading.Timer(timeout_s, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        if not 200 <= response.status < 300:
            hint = " (redirects are not followed)" if 300 <= response.status < 400 else ""
            raise EndpointError(f"HTTP {response.status}{hint}")
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > max_body_bytes:
            raise EndpointError(f"response of {int(declared)} bytes is larger than {max_body_bytes}")
        chunks: list[bytes] = []
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise EndpointError(f"no complete answer within {timeout_s:g} s")
            chunk = response.read1(16384)
            if not chunk:
                break
            total += len(chunk)
            if total > max_body_bytes:
                raise EndpointError(f"response larger than {max_body_bytes} bytes")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if expired.is_set():
            raise EndpointError(f"no complete answer within {timeout_s:g} s") from None
        raise
    finally:
        watchdog.cancel()
        conn.close()
    if expired.is_set():
        raise EndpointError(f"no complete answer within {timeout_s:g} s")
    return b"".join(chunks)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) if isinstance(exc, EndpointError) else f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."
