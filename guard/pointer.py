"""JSON pointers (RFC 6901): where a custom payload keeps its rows, texts and probabilities.

A policy's ``payload:`` names places in a request or an answer with pointers
such as ``/features`` or ``/outputs/0/probabilities``. They are checked once, at
config load (:func:`parse_pointer`); per request a parsed pointer is only
followed (:func:`resolve`) or written through (:func:`replace_at`).

Examples
--------
>>> tokens = parse_pointer("/outputs/0/a~1b")
>>> tokens
('outputs', '0', 'a/b')
>>> resolve({"outputs": [{"a/b": [1, 2]}]}, tokens)
[1, 2]
>>> resolve({"outputs": []}, tokens) is MISSING
True
"""

from __future__ import annotations

import re
from typing import Any, Final

__all__ = ["MISSING", "parse_pointer", "replace_at", "resolve"]


class _Missing:
    """The value of a pointer that leads nowhere in a document."""

    def __repr__(self) -> str:
        return "MISSING"


#: what :func:`resolve` returns when the pointer leads nowhere
MISSING: Final = _Missing()

#: an array index (RFC 6901, section 4): ``0``, or digits without a leading zero
_INDEX = re.compile(r"0|[1-9][0-9]*")
#: a ``~`` not starting one of the two escapes, ``~0`` (``~``) and ``~1`` (``/``)
_BAD_TILDE = re.compile(r"~(?![01])")


def parse_pointer(text: str) -> tuple[str, ...]:
    """The reference tokens of a JSON pointer, unescaped.

    ``""`` is the whole document. Raises :class:`ValueError`, saying what is
    wrong, for anything RFC 6901 does not allow: a pointer that does not start
    with ``/``, or a ``~`` that is not ``~0`` or ``~1``.

    Examples
    --------
    >>> parse_pointer("")
    ()
    >>> parse_pointer("/m~0n/")
    ('m~n', '')
    >>> parse_pointer("features")
    Traceback (most recent call last):
    ...
    ValueError: a JSON pointer starts with '/' (RFC 6901), got 'features'
    """
    if not isinstance(text, str):
        raise ValueError(f"a JSON pointer is a string, got {type(text).__name__}")
    if text == "":
        return ()
    if not text.startswith("/"):
        raise ValueError(f"a JSON pointer starts with '/' (RFC 6901), got {text!r}")
    if _BAD_TILDE.search(text):
        raise ValueError(f"'~' must be escaped as '~0' ('/' as '~1') in a JSON pointer: {text!r}")
    # '~1' first: '~01' is the literal '~1', not '/'
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in text[1:].split("/"))


def _step(node: Any, token: str) -> Any:
    if isinstance(node, dict):
        return node.get(token, MISSING)
    if isinstance(node, list) and _INDEX.fullmatch(token):
        index = int(token)
        return node[index] if index < len(node) else MISSING
    return MISSING  # a scalar, or a list and a token that is no index ('-' included)


def resolve(doc: Any, tokens: tuple[str, ...]) -> Any:
    """The value ``tokens`` lead to in ``doc``, or :data:`MISSING`. Never raises."""
    node = doc
    for token in tokens:
        node = _step(node, token)
        if node is MISSING:
            return MISSING
    return node


def replace_at(doc: Any, tokens: tuple[str, ...], value: Any) -> Any:
    """Put ``value`` where ``tokens`` lead in ``doc`` (changed in place); return the root.

    The root is ``value`` itself for the empty pointer. Raises :class:`KeyError`
    when the pointer leads nowhere (callers :func:`resolve` it first).
    """
    if not tokens:
        return value
    parent = resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        parent[last] = value
    elif isinstance(parent, list) and _INDEX.fullmatch(last) and int(last) < len(parent):
        parent[int(last)] = value
    else:
        raise KeyError(last)
    return doc
