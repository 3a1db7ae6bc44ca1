"""OpenAI chat and completion requests (vLLM and other LLM servers).

The prompt text goes to the text detectors; the sampling fields that drive cost
and leakage (``max_tokens``, ``n``, ``logprobs``, ``top_logprobs``, ``stream``)
go into ``extra``. They are type-checked strictly: a server's lax coercion of
``"max_tokens": "100000"`` must not dodge the token accounting.
"""

from __future__ import annotations

from typing import Any

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.payload._request import ParsedRequest, check_rows, check_texts, fail

__all__ = ["parse_chat", "parse_completion"]


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        fail(400, "bad_type", "the request body must be a JSON object")
    return doc


def _count(doc: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        fail(400, "bad_type", f"'{key}' must be an integer >= {minimum}")
    return value


def _sampling(doc: dict[str, Any]) -> dict[str, Any]:
    max_tokens = _count(doc, "max_completion_tokens", minimum=0)
    if max_tokens is None:
        max_tokens = _count(doc, "max_tokens", minimum=0)
    logprobs = doc.get("logprobs")
    if logprobs is not None and type(logprobs) not in (bool, int):
        fail(400, "bad_type", "'logprobs' must be a boolean or an integer")
    stream = doc.get("stream")
    if stream is not None and type(stream) is not bool:
        fail(400, "bad_type", "'stream' must be a boolean")
    n = _count(doc, "n", minimum=1)
    return {
        "max_tokens": max_tokens,
        "n": 1 if n is None else n,
        # completions take an int (0 still returns the sampled token's logprob)
        "logprobs": logprobs is not None and logprobs is not False,
        "top_logprobs": _count(doc, "top_logprobs", minimum=0) or 0,
        "stream": bool(stream),
    }


def _content(content: object, out: list[str]) -> None:
    if content is None:
        return
    if isinstance(content, str):
        out.append(content)
        return
    if not isinstance(content, list):
        fail(400, "bad_type", "a message's 'content' must be a string or a list of parts")
    for part in content:
        if not isinstance(part, dict):
            fail(400, "bad_type", "each content part must be an object")
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                fail(400, "bad_type", "a text part's 'text' must be a string")
            out.append(text)


def parse_chat(doc: object, limits: LimitsConfig) -> ParsedRequest:
    """``/v1/chat/completions``: one prompt, the messages' text contents joined with ``\\n``."""
    body = _object(doc)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        fail(400, "bad_shape", "'messages' must be a non-empty list")
    pieces: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            fail(400, "bad_type", "each message must be an object")
        _content(message.get("content"), pieces)
    texts = ("\n".join(pieces),)
    check_texts(texts, limits)
    return ParsedRequest("openai_chat", None, texts, 1, _sampling(body))


def parse_completion(doc: object, limits: LimitsConfig) -> ParsedRequest:
    """``/v1/completions``: ``prompt`` is a string, strings, token ids, or lists of token ids."""
    body = _object(doc)
    prompt = body.get("prompt")
    texts: tuple[str, ...] = ()
    n_prompts = 1
    if isinstance(prompt, str):
        texts = (prompt,)
    elif isinstance(prompt, list):
        types = set(map(type, prompt))
        if not prompt:
            fail(400, "bad_shape", "'prompt' is an empty list")
        if types == {str}:
            texts = tuple(prompt)
            n_prompts = len(texts)
        elif types == {list}:
            n_prompts = len(prompt)
            if not all(set(map(type, p)) <= {int} for p in prompt):
                fail(400, "bad_type", "token-id prompts must be lists of integers")
        elif types != {int}:
            fail(400, "bad_type", "'prompt' must be strings or token ids")
    elif prompt is not None:
        fail(400, "bad_type", "'prompt' must be a string or a list")
    check_rows(n_prompts, limits)
    check_texts(texts, limits)
    return ParsedRequest("openai_completion", None, texts, n_prompts, _sampling(body))
