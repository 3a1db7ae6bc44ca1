"""JSON pointers (RFC 6901): parsing, following and writing through them."""

from __future__ import annotations

from typing import Any

import pytest

from inference_guard.guard.pointer import MISSING, parse_pointer, replace_at, resolve

#: the example document of RFC 6901, section 5
RFC_DOC: dict[str, Any] = {
    "foo": ["bar", "baz"],
    "": 0,
    "a/b": 1,
    "c%d": 2,
    "e^f": 3,
    "g|h": 4,
    "i\\j": 5,
    'k"l': 6,
    " ": 7,
    "m~n": 8,
}


@pytest.mark.parametrize(
    ("pointer", "value"),
    [
        ("", RFC_DOC),
        ("/foo", ["bar", "baz"]),
        ("/foo/0", "bar"),
        ("/", 0),
        ("/a~1b", 1),
        ("/c%d", 2),
        ("/e^f", 3),
        ("/g|h", 4),
        ("/i\\j", 5),
        ('/k"l', 6),
        ("/ ", 7),
        ("/m~0n", 8),
    ],
)
def test_rfc6901_examples(pointer: str, value: object) -> None:
    assert resolve(RFC_DOC, parse_pointer(pointer)) == value


def test_tilde_escapes_unescape_in_order() -> None:
    # '~01' is a literal '~1', not '/'
    assert parse_pointer("/~01") == ("~1",)


@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        ("features", "starts with '/'"),
        ("/a~2", "escaped"),
        ("/a~", "escaped"),
    ],
)
def test_invalid_pointers_are_refused(pointer: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pointer(pointer)


@pytest.mark.parametrize(
    "pointer", ["/missing", "/foo/2", "/foo/-", "/foo/01", "/foo/x", "/foo/0/deeper", "/a~1b/0"]
)
def test_pointers_leading_nowhere_resolve_to_missing(pointer: str) -> None:
    assert resolve(RFC_DOC, parse_pointer(pointer)) is MISSING


def test_replace_at_writes_in_place_and_returns_the_root() -> None:
    doc: dict[str, Any] = {"out": [{"p": [0.123]}]}
    assert replace_at(doc, parse_pointer("/out/0/p"), [0.1]) is doc
    assert doc == {"out": [{"p": [0.1]}]}
    assert replace_at(doc, (), [1]) == [1]
    with pytest.raises(KeyError):
        replace_at(doc, parse_pointer("/out/1/p"), 0)
