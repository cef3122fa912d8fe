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
  failures are not cached, so they are retried later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

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
        timeout_s: per-request timeout.
        temperature, top_p: sampling settings (the authors used 0.6 / 0.9 with Llama-3-8B).
        max_words: length limit asked for definitions.
        retry_after_s: after a failure, skip the endpoint for this long.
    """

    endpoint: str = ""
    model: str = ""
    api_key_env: str = ""
    timeout_s: float = 10.0
    temperature: float = 0.6
    top_p: float = 0.9
    max_words: int = 30
    retry_after_s: float = 60.0

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


def clean_answer(text: str, kind: str) -> str:
    """Normalise a model answer: first line, no quotes or list markers, no 'Definition:' prefix."""
    text = text.strip()
    text = re.sub(r"^<think>.*?</think>", "", text, flags=re.S).strip()  # reasoning models
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:[-*\u2022]|\d+[.)])\s*", "", line).strip("\"'` ")
    line = re.sub(r"^(?:definition|synonym|answer)\s*:\s*", "", line, flags=re.I)
    line = line.strip().strip("\"'`").strip()
    if kind == "synonym":
        line = line.split(",")[0].strip().rstrip(".").strip()
    return line


class LLMTextClient:
    """Ask the endpoint for one auxiliary text per class name; cache answers in memory and on disk.

    Args:
        config: the endpoint settings.
        cache_dir: folder for the answer cache ("" keeps answers in memory only).
        opener: ``urllib.request.urlopen``-like callable (tests may inject one; default: urlopen).
    """

    def __init__(
        self,
        config: LLMConfig,
        cache_dir: str | Path = "",
        opener: Optional[Callable[..., Any]] = None,
    ) -> None:
        self.config = config
        self._open = opener or urllib.request.urlopen
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
        request = urllib.request.Request(
            chat_url(cfg.endpoint), data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with self._lock:
            self.stats["requests"] += 1
        with self._open(request, timeout=cfg.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
        content = payload["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"unexpected content type {type(content).__name__}")
        return clean_answer(content, kind)

    def _read_cache(self) -> dict[str, str]:
        if self._file is None:
            return {}
        try:
            data = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.get("answers", {}).items()} if isinstance(data, dict) else {}

    def _write_cache(self) -> None:
        if self._file is None:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._file.with_name(f".{self._file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            doc = {"endpoint": chat_url(self.config.endpoint), "model": self.config.model,
                   "prompt_version": PROMPT_VERSION, "answers": self._cache}
            tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
            tmp.replace(self._file)  # atomic: a reader never sees half a file
        except OSError as exc:
            log.warning("LLM text cache write failed (%s); answers kept in memory only", exc)


def _short(exc: BaseException, limit: int = 200) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."
