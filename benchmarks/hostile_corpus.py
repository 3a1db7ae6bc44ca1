"""The hostile-request corpus: seeded generators of what a public model API is sent.

The in-process fuzz test (``tests/middleware/test_fuzz.py``) drives ``GuardMiddleware``
with them; the hostile-traffic benchmark sends them over real HTTP.
:func:`random_request` and its parts make random bytes, random JSON, mutated valid
payloads of every format the guard parses, Triton binary requests with lying
sizes, hostile headers, bodies in odd chunks. The fuzz test's thresholds depend on
the exact sequence of random draws: change it only together with that test.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

V2 = "/v2/models/m/infer"
V1 = "/v1/models/m:predict"

# --------------------------------------------------------------------------- fuzz generator

SCALARS: list[Any] = [
    0,
    1,
    -1,
    0.5,
    16,
    3,
    1e308,
    -1e308,
    5e-324,
    2**63,
    2**64,
    10**400,
    -(10**400),
    True,
    False,
    None,
    "",
    "x",
    "1.5",
    "NaN",
    "\u202e",
    "\x00",
    "\U0001f600",
    "\ud800",
]
KEYS = [
    "inputs",
    "instances",
    "data",
    "shape",
    "datatype",
    "name",
    "prompt",
    "messages",
    "content",
    "dataframe_split",
    "dataframe_records",
    "columns",
    "parameters",
    "outputs",
    "max_tokens",
    "n",
    "logprobs",
    "stream",
    "binary_data_size",
    "examples",
    "type",
    "text",
]
PATHS = [
    V2,
    "/v2/models/m/versions/1/infer",
    V1,
    "/v1/models/m:classify",
    "/invocations",
    "/v1/chat/completions",
    "/v1/completions",
    "/v2/models/m/infer/",
    "/healthz",
    "/v2/models//infer",
    "/v1/models/m:predict/x",
    "/metrics",
]
CTYPES: list[bytes] = [
    b"application/json",
    b"application/json; charset=utf-8",
    b"APPLICATION/JSON",
    b"text/plain",
    b"application/octet-stream",
    b"application/vnd.kserve+json",
    b"",
    b";",
    b"multipart/form-data",
    b"application/json\x00",
    b"application/x-www-form-urlencoded",
    b"\xff\xfe",
]


def random_json(r: random.Random, depth: int = 0) -> Any:
    k = r.random()
    if depth > 6 or k < 0.35:
        return r.choice(SCALARS)
    if k < 0.7:
        return [random_json(r, depth + 1) for _ in range(r.randint(0, 5))]
    return {r.choice(KEYS): random_json(r, depth + 1) for _ in range(r.randint(0, 4))}


def valid_requests(r: random.Random) -> list[tuple[str, Any]]:
    """One valid request of every format the guard parses."""
    n = r.randint(1, 3)
    rows = [[round(r.uniform(0, 16), 3) for _ in range(64)] for _ in range(n)]
    flat = [x for row in rows for x in row]
    return [
        (V2, {"inputs": [{"name": "x", "shape": [n, 64], "datatype": "FP32", "data": flat}]}),
        (
            V2,
            {
                "inputs": [{"name": "x", "shape": [n, 64], "datatype": "FP64", "data": rows}],
                "outputs": [{"name": "probabilities"}],
            },
        ),
        (
            V2,
            {
                "inputs": [
                    {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                    {
                        "name": "x",
                        "shape": [n, 64],
                        "datatype": "INT32",
                        "data": [int(x) for x in flat],
                    },
                ]
            },
        ),
        (V1, {"instances": rows}),
        (V1, {"inputs": {"input-0": rows}}),
        (V1, {"instances": rows, "parameters": {"labels_only": True}}),
        (
            "/invocations",
            {"dataframe_split": {"columns": [f"c{i}" for i in range(64)], "data": rows}},
        ),
        (
            "/invocations",
            {"dataframe_records": [{f"c{i}": v for i, v in enumerate(row)} for row in rows]},
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16},
        ),
        ("/v1/completions", {"model": "m", "prompt": ["hi", "there"], "n": 2, "logprobs": 3}),
        ("/v1/completions", {"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 10**30}),
    ]


def mutate(r: random.Random, doc: Any) -> Any:
    """Replace one random node of ``doc`` with something hostile."""
    if isinstance(doc, dict) and doc and r.random() < 0.8:
        key = r.choice(list(doc))
        out = dict(doc)
        out[key] = mutate(r, doc[key]) if r.random() < 0.6 else random_json(r)
        return out
    if isinstance(doc, list) and doc and r.random() < 0.8:
        out_list = list(doc)
        i = r.randrange(len(out_list))
        out_list[i] = mutate(r, out_list[i]) if r.random() < 0.6 else random_json(r)
        if r.random() < 0.2:
            out_list.append(random_json(r))
        return out_list
    return random_json(r)


def dumps(doc: Any) -> bytes:
    # allow_nan: NaN/Infinity literals are part of the attack surface
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


def binary_request(r: random.Random) -> tuple[bytes, bytes]:
    """A Triton binary-extension request with random lies in sizes, shapes and header.

    Zero-element tensors of three or more dimensions are left out: they are a
    known bug (see ``test_zero_element_tensor_is_a_clean_400`` in
    ``tests/middleware/test_fuzz.py``).
    """
    n = r.randint(0, 3)
    data = struct.pack(f"<{n * 4}f", *[r.uniform(0, 16) for _ in range(n * 4)])
    size = len(data) + r.choice([0, 0, 0, -1, 1, 4, 10**6, 10**30])
    shape = r.choice([[n, 4], [n, 4], [n], [max(n, 1), 4, 1], [-1, 4], [2**62, 2], "x"])
    datatype = r.choice(["FP32", "FP32", "BF16", "FP16", "BOOL", "BYTES", "INT64", "UINT64", "?"])
    tensor = {
        "name": "x",
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    body = header + data + r.choice([b"", b"", b"\x00\x00\x80\x7f", b"\x00" * 3])
    length = r.choice(
        [
            str(len(header)),
            str(len(header)),
            "0",
            "-1",
            str(len(body) + 1),
            "abc",
            " 12 ",
            "1" * 30,
            "\u0661\u0662",
            "",
        ]
    )
    return body, length.encode("utf-8")


def random_headers(r: random.Random, body: bytes) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    if r.random() < 0.85:
        headers.append(
            (b"content-type", r.choice(CTYPES[:2]) if r.random() < 0.7 else r.choice(CTYPES))
        )
    if r.random() < 0.35:
        headers.append(
            (
                b"x-api-key",
                r.choice(
                    [
                        b"k1",
                        b"k2",
                        b"k3",
                        b"",
                        b"\xff\xfe",
                        b"a" * 5000,
                        b" ",
                        f"k{r.random()}".encode(),
                    ]
                ),
            )
        )
    if r.random() < 0.2:
        headers.append(
            (
                b"authorization",
                r.choice(
                    [
                        b"Bearer tok",
                        b"Bearer ",
                        b"Basic dXNlcjpwYXNz",
                        b"bearer \xfe",
                        b"Bearer " + b"t" * 5000,
                        b"BEARER x",
                    ]
                ),
            )
        )
    if r.random() < 0.1:
        headers.append((b"x-forwarded-for", r.choice([b"1.2.3.4", b"nonsense", b"1.2.3.4, ::1"])))
    if r.random() < 0.2:
        # content-length that tells the truth, lies small, lies large, or is not a number
        headers.append(
            (
                b"content-length",
                r.choice(
                    [
                        str(len(body)).encode(),
                        b"0",
                        b"1",
                        str(len(body) + 100).encode(),
                        b"-1",
                        b"abc",
                        b"99999999999999",
                        b"1, 2",
                        b"",
                        b"\xb2",
                    ]
                ),
            )
        )
    if r.random() < 0.1:
        headers.append((b"inference-header-content-length", r.choice([b"5", b"x", b"0"])))
    if r.random() < 0.1:
        headers.append((b"x-junk", bytes(r.getrandbits(8) for _ in range(r.randint(0, 64)))))
    if r.random() < 0.1:
        headers = headers + headers  # every header twice
    if r.random() < 0.05:
        headers.append((b"x-api-key", b"other-key"))  # conflicting credentials
    r.shuffle(headers)
    return headers


def random_request(r: random.Random) -> tuple[str, str, list[tuple[bytes, bytes]], list[bytes]]:
    """(method, path, headers, body chunks) of one hostile request."""
    k = r.random()
    extra: list[tuple[bytes, bytes]] = []
    if k < 0.15:
        path = r.choice(PATHS)
        body = bytes(r.getrandbits(8) for _ in range(r.randint(0, 256)))
    elif k < 0.4:
        path = r.choice(PATHS)
        body = dumps(random_json(r))
    elif k < 0.85:
        path, doc = r.choice(valid_requests(r))
        body = dumps(mutate(r, doc) if r.random() < 0.9 else doc)
    else:
        path = V2
        body, length = binary_request(r)
        extra = [
            (b"inference-header-content-length", length),
            (b"content-type", r.choice([b"application/octet-stream", b"application/json"])),
        ]
    headers = extra + random_headers(r, body)
    method = r.choice(["POST"] * 10 + ["GET", "PUT", "HEAD", "post"])
    chunks = [body]
    if body and r.random() < 0.25:
        cuts = sorted(r.sample(range(len(body) + 1), min(4, len(body) + 1)))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        chunks.insert(r.randrange(len(chunks) + 1), b"")  # an empty chunk somewhere
    return method, path, headers, chunks
