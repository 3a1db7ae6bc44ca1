"""The guard's error bodies as a test reads them: the shape checked, the message returned.

OIP v2 and KServe v1 routes get ``{"error": "<message>"}``, OpenAI routes
OpenAI's ``{"error": {"message", "type", "param", "code"}}``, other routes
``{"error": {"code", "message", "request_id"}}``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_MODEL_ROUTES = re.compile(r"/v[12]/models(?:/|\Z)")
_OPENAI = re.compile(r"/v1/(?:chat/)?completions/?\Z")


def error_message(
    body: bytes | str | Any, path: str, request_id: str | None = None, code: str | None = None
) -> str:
    """The message of a guard error body on ``path``, its shape checked.

    ``request_id`` and ``code``, when given, must match where the shape has them.
    """
    doc = json.loads(body) if isinstance(body, bytes | str) else body
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    error = doc["error"]
    if _OPENAI.search(path):
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] is None and isinstance(error["type"], str)
        assert code is None or error["code"] == code, error
        message = error["message"]
    elif _MODEL_ROUTES.search(path):
        assert isinstance(error, str), error
        message = error
    else:
        assert set(error) == {"code", "message", "request_id"}, error
        assert request_id is None or error["request_id"] == request_id, error
        assert code is None or error["code"] == code, error
        message = error["message"]
    assert isinstance(message, str) and message, doc
    return message
