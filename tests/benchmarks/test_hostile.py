"""The hostile-traffic benchmark (benchmarks/hostile.py): corpus, wire client, a small run."""

from __future__ import annotations

import pytest

from benchmarks import hostile
from benchmarks._hostile_http import encode
from benchmarks.hostile_corpus import KINDS, RAW_CASES, HostileRequest, build, corpus


def test_the_corpus_is_seeded_and_each_request_rebuilds_alone() -> None:
    first = list(corpus(3, 200))
    assert first == [build(3, i) for i in range(200)]
    assert first != list(corpus(4, 200))


def test_the_corpus_draws_every_kind() -> None:
    drawn = [r.kind for r in corpus(0, 3000)]
    assert {k.split(":")[0] for k in drawn} == set(KINDS)
    assert len({k for k in drawn if k.startswith("raw_http:")}) > len(RAW_CASES) // 2


def test_content_length_is_the_framing_and_pieces_go_chunked() -> None:
    headers = [(b"content-length", b"999"), (b"x-junk", b"\xff\x00"), (b"x-junk", b"2")]
    one = encode(HostileRequest("t", "post", "/p", headers, [b"abcd"]), b"h")
    assert one == (
        b"post /p HTTP/1.1\r\nhost: h\r\nconnection: close\r\nx-junk: \xff\x00\r\n"
        b"x-junk: 2\r\ncontent-length: 4\r\n\r\nabcd"
    )
    pieces = encode(HostileRequest("t", "POST", "/p", headers, [b"ab", b"", b"cde"]), b"h")
    head, body = pieces.split(b"\r\n\r\n", 1)
    assert b"content-length" not in head and head.endswith(b"transfer-encoding: chunked")
    assert body == b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"


def test_raw_requests_go_out_as_they_are() -> None:
    raw = next(r for r in corpus(0, 1000) if r.raw is not None)
    assert encode(raw, b"h") == raw.raw


def test_crashes_behind_the_guard_are_read_by_the_fragile_apps_exception() -> None:
    width = hostile._signature(
        b"ValueError: X has 63 features, but LogisticRegression is expecting 64 features as input."
    )
    assert hostile.reading(width) == "width"
    assert hostile.reading(hostile._signature(b"KeyError: 'inputs'")) == "other"
    assert hostile._signature(b"UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff") == (
        "UnicodeDecodeError: '…' codec can't decode byte N"
    )


@pytest.mark.e2e
def test_a_small_run_finds_no_guard_fault_and_crashes_the_bare_app() -> None:
    """Four real servers, 400 corpus requests each (a first run calibrates the demo, ~30 s)."""
    result = hostile.run(400, seed=1)
    demo, behind = result.served["guarded_demo"], result.served[hostile.BEHIND]
    assert demo.how == {"answered": 400}, demo.how
    assert all(0 < s < 500 for s in demo.status)
    assert result.guard_faults() == {"guarded_demo": [], hostile.BEHIND: [], hostile.SIGNED: []}
    # the harness can fail: the careless app does crash bare, and the guard stops most of it
    crashers, residual = result.crashers(), result.residual()
    assert len(crashers) > 100, len(crashers)
    assert len(residual) < len(crashers) / 4, (len(residual), len(crashers))
    # what still gets through is only what the model's signature would rule out
    assert result.unexplained() == [], [behind.crash[i] for i in result.unexplained()]
    for served in (demo, behind):
        refused = sum(served.refusals().values())
        assert refused > 100
        assert sum(served.delta("guard_invalid_requests_total").values()) == refused
        assert not served.delta("guard_errors_total")
    assert demo.tracebacks == 0, demo.traceback_tails
    assert behind.tracebacks == len(residual)  # the app's own crashes, logged by uvicorn
    assert "## Hostile traffic (issue 13)" in hostile.report(result, "test", 0)
    # told the model's signature, the guard stops the rest: nothing gets through it that
    # crashes the app, and what it refuses that the bare app served is for another model
    signed = result.served[hostile.SIGNED]
    assert result.residual(hostile.SIGNED) == [], [
        signed.crash[i] for i in result.residual(hostile.SIGNED)
    ]
    assert signed.tracebacks == 0, signed.traceback_tails
    assert result.refused_servable() != []  # FP64 and INT32 requests: not this model's FP32
