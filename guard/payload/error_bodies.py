"""The guard's own error bodies, in the shape each route's protocol defines.

A client reads the guard's refusals with the same code that reads the model
server's errors, so the body follows the route's protocol:

* Open Inference Protocol v2 (``/v2/models/...``) and KServe v1
  (``/v1/models/...``): ``{"error": "<message>"}``, as MLServer, Triton and
  KServe answer (``tritonclient`` raises it as an ``InferenceServerException``
  whose ``message()`` is the string);
* OpenAI (``/v1/chat/completions``, ``/v1/completions``): OpenAI's error object
  ``{"error": {"message", "type", "param", "code"}}``;
* any other route: ``{"error": {"code", "message", "request_id"}}``.

The request id is always in the ``X-Request-ID`` header as well.
"""

from __future__ import annotations

import json
import re
from typing import Final, Literal

from inference_guard.guard.payload.adapters import detect_format

__all__ = ["ErrorStyle", "error_body", "error_style"]

#: how an error body is shaped (:func:`error_style`)
ErrorStyle = Literal["plain", "openai", "guard"]

#: a path under a model-serving protocol's model routes (metadata, readiness, infer)
_MODEL_ROUTES: Final = re.compile(r"/v[12]/models(?:/|\Z)")
_OPENAI: Final = ("openai_chat", "openai_completion")
#: OpenAI's error ``type`` by status; anything else 4xx is an invalid request
_OPENAI_TYPES: Final = {403: "permission_error", 429: "rate_limit_error"}


def error_style(path: str) -> ErrorStyle:
    """The error body shape of the route ``path``.

    Examples
    --------
    >>> error_style("/v2/models/iris/infer"), error_style("/v1/models/iris:predict")
    ('plain', 'plain')
    >>> error_style("/v1/chat/completions"), error_style("/predict")
    ('openai', 'guard')
    """
    fmt = detect_format(path)
    if fmt in _OPENAI:
        return "openai"
    if fmt in ("oip_v2", "kserve_v1") or _MODEL_ROUTES.search(path):
        return "plain"
    return "guard"


def error_body(
    style: ErrorStyle,
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    reason: str | None = None,
) -> bytes:
    """The JSON body of a guard error in ``style``.

    ``request_id`` and ``reason`` (the proxy's upstream failure) are given only
    in the guard's own shape; the protocols' shapes have no place for them.

    Examples
    --------
    >>> error_body("plain", 429, "rate_limited", "slow down")
    b'{"error":"slow down"}'
    >>> json.loads(error_body("openai", 429, "rate_limited", "slow down"))["error"]["type"]
    'rate_limit_error'
    """
    error: object
    if style == "plain":
        error = message
    elif style == "openai":
        if status >= 500:
            kind = "server_error"
        else:
            kind = _OPENAI_TYPES.get(status, "invalid_request_error")
        error = {"message": message, "type": kind, "param": None, "code": code}
    else:
        fields = {"code": code, "message": message}
        if request_id is not None:
            fields["request_id"] = request_id
        if reason is not None:
            fields["reason"] = reason
        error = fields
    return json.dumps({"error": error}, separators=(",", ":")).encode()
