"""The hostile-request corpus: seeded generators of what a public model API is sent.

Shared by the in-process fuzz test (``tests/middleware/test_fuzz.py``, which
drives ``GuardMiddleware`` with hand-built ASGI messages) and the hostile-traffic
benchmark (``benchmarks/hostile.py``, which sends the same requests over real
HTTP). Two layers:

* **The fuzz generator**, :func:`random_request` and its parts: random bytes,
  random JSON, mutated valid payloads of every format the guard parses, Triton
  binary requests with lying sizes, hostile headers, bodies in odd chunks. The
  fuzz test's thresholds depend on its exact sequence of random draws: change
  it only together with that test.
* **The corpus**, :func:`corpus`: the fuzz generator plus the kinds it lacks
  (wrong widths, wrong types in KServe v1, OIP v2 and OpenAI payloads, BYTES
  tensors sent to a numeric input, NaN and extreme values in valid payloads,
  other encodings, deep and huge bodies, oversized and numerous headers, path
  variants, malformed HTTP framing), each request tagged with its kind
  (:data:`KINDS`). Request ``i`` of a seed is drawn from its own RNG, so it can
  be rebuilt alone (:func:`build`).

Payloads are shaped for a 64-feature classifier served as ``model`` (the demo's
digits model); the fuzz generator's paths name a model ``m``, which the corpus
renames.
"""

from __future__ import annotations

import base64
import json
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

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


# --------------------------------------------------------------------------- the corpus

#: the width of the rows :func:`valid_requests` sends (the demo's digits model)
WIDTH = 64
JSON_CT = (b"content-type", b"application/json")
#: a value that stands for a literal JSON cannot encode (``1e400``), swapped in after dumping
_MARK = 1234567.125


class HostileRequest(NamedTuple):
    """One corpus request, as a client sends it."""

    #: the generator that made it (a key of :data:`KINDS`)
    kind: str
    #: the request method, as sent (not always upper case)
    method: str
    #: the request target
    path: str
    #: header lines in order, repeats included
    headers: list[tuple[bytes, bytes]]
    #: the body, in the pieces the client sends it in
    chunks: list[bytes]
    #: the whole request as bytes on the wire, where fields cannot say it (bad framing);
    #: ``None``: a client builds it from the fields
    raw: bytes | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def _post(
    kind: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> HostileRequest:
    return HostileRequest(kind, "POST", path, [JSON_CT] if headers is None else headers, [body])


def _routes(model: str) -> tuple[str, str]:
    return f"/v2/models/{model}/infer", f"/v1/models/{model}:predict"


def _rows(r: random.Random, n: int, width: int = WIDTH) -> list[list[float]]:
    return [[float(r.randint(0, 16)) for _ in range(width)] for _ in range(n)]


def _v2(data: Any, shape: Any, datatype: Any = "FP32", name: Any = "input-0") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def fuzz_request(r: random.Random, model: str) -> HostileRequest:
    """The fuzz test's draw against a real model: up to four tries for a POST to its routes."""
    routes = set(_routes(model))
    for _ in range(4):
        method, path, headers, chunks = random_request(r)
        path = path.replace("/models/m", f"/models/{model}")
        if method == "POST" and path in routes:
            break
    return HostileRequest("fuzz", method, path, headers, chunks)


def benign(r: random.Random, model: str) -> HostileRequest:
    """One of :func:`valid_requests`, untouched."""
    path, doc = r.choice(valid_requests(r))
    return _post("benign", path.replace("/models/m", f"/models/{model}"), dumps(doc))


def wrong_width(r: random.Random, model: str) -> HostileRequest:
    """Well-formed rows of a consistent width the model was not built for."""
    v2, v1 = _routes(model)
    n = r.randint(1, 3)
    width = r.choice([1, 2, 8, 32, 63, 65, 100, 128, 784])
    rows = _rows(r, n, width)
    form = r.randrange(4)
    if form == 0:
        return _post("wrong_width", v2, dumps(_v2([x for row in rows for x in row], [n, width])))
    if form == 1:
        return _post("wrong_width", v2, dumps(_v2(rows, [n, width], "FP64")))
    if form == 2:
        return _post("wrong_width", v1, dumps({"instances": rows}))
    split = {"columns": [f"c{i}" for i in range(width)], "data": rows}
    return _post("wrong_width", "/invocations", dumps({"dataframe_split": split}))


def kserve_v1_types(r: random.Random, model: str) -> HostileRequest:
    """KServe v1 ``:predict`` documents with the wrong type somewhere."""
    _, v1 = _routes(model)
    row = _rows(r, 1)[0]
    bad: Any = r.choice(
        [
            "abc",
            5,
            None,
            {},
            [],
            [[]],
            [[str(x) for x in row]],
            [[True] * WIDTH],
            [[None] * WIDTH],
            [[*row[:10], "x", *row[11:]]],
            [{"a": 1}],
            [{"b64": "aGVsbG8="}],
            [[row]],
            [row, row[:-1]],
            [row, "row"],
            [[[x] for x in row]],
            [row] * r.choice([1025, 2000]),
        ]
    )
    doc: dict[str, Any] = r.choice(
        [
            {"instances": bad},
            {"inputs": bad},
            {"inputs": {"input-0": bad}},
            {"instances": [row], "parameters": bad},
            {"instances": [row], "signature_name": bad},
            {"instances": bad, "inputs": [row]},
        ]
    )
    return _post("kserve_v1_types", v1, dumps(doc))


def oip_types(r: random.Random, model: str) -> HostileRequest:
    """OIP v2 ``/infer`` documents with a wrong type, name or structure in the tensor."""
    v2, _ = _routes(model)
    n = r.randint(1, 2)
    flat = [x for row in _rows(r, n) for x in row]
    shape = [n, WIDTH]
    tensor = _v2(flat, shape)["inputs"][0]
    key, value = r.choice(
        [
            ("shape", [str(n), str(WIDTH)]),
            ("shape", [float(n), float(WIDTH)]),
            ("shape", n * WIDTH),
            ("shape", None),
            ("shape", [n, WIDTH, 1, 1]),
            ("shape", [n * WIDTH]),
            ("shape", [WIDTH, n]),
            ("data", {"x": flat}),
            ("data", "".join(str(x) for x in flat)),
            ("data", [bool(x) for x in flat]),
            ("data", [[x] for x in flat]),
            ("data", None),
            ("datatype", "FP33"),
            ("datatype", 32),
            ("datatype", "INT8"),
            ("datatype", "UINT8"),
            ("datatype", "BOOL"),
            ("name", 7),
            ("name", None),
            ("parameters", "x"),
        ]
    )
    if key == "datatype" and value in ("INT8", "UINT8"):
        flat = [x * 1000 - 500 for x in flat]  # out of the type's range
        tensor["data"] = flat
    tensor = {**tensor, key: value}
    if r.random() < 0.15:
        tensor.pop(r.choice(["shape", "data", "datatype", "name"]))
    outer: Any = r.choice(
        [
            {"inputs": [tensor]},
            {"inputs": [tensor]},
            {"inputs": tensor},
            {"inputs": [tensor], "outputs": [{"name": 5}]},
            {"inputs": [tensor], "outputs": "probabilities"},
            {"inputs": [tensor, tensor]},
            {"inputs": []},
            {"id": {"x": 1}, "inputs": [tensor]},
        ]
    )
    return _post("oip_types", v2, dumps(outer))


def bytes_to_fp32(r: random.Random, model: str) -> HostileRequest:
    """A BYTES tensor (numbers as strings, base64, text) where the model takes FP32 numbers."""
    v2, _ = _routes(model)
    n = r.randint(1, 2)
    flat = [x for row in _rows(r, n) for x in row]
    form = r.randrange(4)
    data: Any
    if form == 0:
        data = [str(x) for x in flat]
    elif form == 1:
        data = [base64.b64encode(struct.pack(f"<{WIDTH}f", *flat[:WIDTH])).decode()] * n
        return _post("bytes_to_fp32", v2, dumps(_v2(data, [n], "BYTES")))
    elif form == 2:
        data = ["seven"] * (n * WIDTH)
    else:
        data = [str(x) for x in flat]
        return _post("bytes_to_fp32", v2, dumps(_v2(data, [n, WIDTH], "FP32")))
    return _post("bytes_to_fp32", v2, dumps(_v2(data, [n, WIDTH], "BYTES")))


def openai_types(r: random.Random, model: str) -> HostileRequest:
    """OpenAI chat and completion requests with wrong types or absurd values."""
    chat = r.random() < 0.6
    doc: dict[str, Any] = (
        {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
        if chat
        else {"model": model, "prompt": "hello", "max_tokens": 16}
    )
    key, value = r.choice(
        [
            ("max_tokens", "9"),
            ("max_tokens", -1),
            ("max_tokens", 1.5),
            ("max_tokens", 10**30),
            ("max_tokens", True),
            ("n", "2"),
            ("n", 0),
            ("n", 10**9),
            ("temperature", "hot"),
            ("temperature", -1),
            ("logprobs", "yes"),
            ("top_logprobs", 10**9),
            ("stream", "yes"),
            ("stop", [1, 2]),
            ("model", 5),
            ("tools", "x"),
            ("messages" if chat else "prompt", "x" * 200_001),
            ("messages" if chat else "prompt", {}),
            ("messages" if chat else "prompt", [None]),
            ("messages" if chat else "prompt", [[1.5, 2]]),
            ("messages", [{"role": 1, "content": "x"}]),
            ("messages", [{"role": "user", "content": None}]),
            ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            ("messages", [{"content": "x"}]),
            ("messages", []),
        ]
    )
    doc[key] = value
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return _post("openai_types", path, dumps(doc))


def _numeric_valid(r: random.Random, model: str) -> tuple[str, Any]:
    path, doc = r.choice([v for i, v in enumerate(valid_requests(r)) if i in (0, 1, 3, 6)])
    return path.replace("/models/m", f"/models/{model}"), doc


def _poke(r: random.Random, doc: Any, value: Any, times: int) -> Any:
    """``doc`` with ``times`` random numbers replaced by ``value``."""
    spots: list[tuple[list[Any], int]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, float):
                    spots.append((node, i))
                else:
                    walk(v)

    walk(doc)
    for node, i in r.sample(spots, min(times, len(spots))):
        node[i] = value
    return doc


def nan_inf(r: random.Random, model: str) -> HostileRequest:
    """A valid numeric request with NaN, Infinity or an overflowing literal in it."""
    path, doc = _numeric_valid(r, model)
    literal = r.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
    body = dumps(_poke(r, doc, _MARK, r.randint(1, 3))).replace(repr(_MARK).encode(), literal)
    return _post("nan_inf", path, body)


def extreme_finite(r: random.Random, model: str) -> HostileRequest:
    """A valid numeric request with huge or tiny finite values in it."""
    path, doc = _numeric_valid(r, model)
    value = r.choice([1e308, -1e308, 1e200, 5e-324, 2.0**63, 1e16, -1e16])
    return _post("extreme_finite", path, dumps(_poke(r, doc, value, r.randint(1, WIDTH))))


def encoding(r: random.Random, model: str) -> HostileRequest:
    """A payload in an encoding other than UTF-8, or UTF-8 that is not quite."""
    _, v1 = _routes(model)
    text = json.dumps({"instances": _rows(r, 1), "parameters": {"note": "café ☃"}})
    body = r.choice(
        [
            text.encode("utf-16"),
            text.encode("utf-16-le"),
            text.encode("utf-32"),
            text.encode("latin-1", "replace"),
            b"\xef\xbb\xbf" + text.encode(),  # a byte-order mark
            text.encode().replace(b"caf\xc3\xa9", b"caf\xc0\xa9"),  # an overlong sequence
            text.encode().replace(b"note", b"n\xffte"),
            text.replace("café", "\\ud800\\udc00\\ud800").encode(),  # escaped lone surrogates
        ]
    )
    return _post("encoding", v1, body)


def deep(r: random.Random, model: str) -> HostileRequest:
    """Nesting past any sane depth: bare, or inside a valid-looking document."""
    v2, v1 = _routes(model)
    depth = r.choice([33, 100, 1_000, 10_000, 100_000])
    form = r.randrange(3)
    if form == 0:
        body = b"[" * depth + b"]" * depth
    elif form == 1:
        body = b'{"instances": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    else:
        body = b'{"a":' * depth + b"1" + b"}" * depth
    return _post("deep", r.choice([v1, v2]), body)


def huge(r: random.Random, model: str) -> HostileRequest:
    """Bodies around and past the default 1 MiB cap, in one piece or in many chunks."""
    _, v1 = _routes(model)
    row = b"[" + b",".join(b"%d" % x for x in range(WIDTH)) + b"]"
    n = r.choice([3_000, 6_000, 9_000])  # about 0.5, 1 and 1.5 MB
    body = b'{"instances": [' + b",".join([row] * n) + b"]}"
    if r.random() < 0.5:
        return _post("huge", v1, body)
    step = 64 * 1024
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    return HostileRequest("huge", "POST", v1, [JSON_CT], chunks)


def big_headers(r: random.Random, model: str) -> HostileRequest:
    """One oversized header, or a great many small ones, on a valid request."""
    _, v1 = _routes(model)
    body = dumps({"instances": _rows(r, 1)})
    headers = [JSON_CT]
    form = r.randrange(4)
    if form == 0:
        size = r.choice([4_000, 8_000, 15_000, 20_000, 70_000])
        name = r.choice([b"x-api-key", b"authorization", b"cookie", b"x-junk"])
        headers.append((name, b"a" * size))
    elif form == 1:
        headers += [(b"x-h-%d" % i, b"v") for i in range(r.choice([100, 500, 1_000, 3_000]))]
    elif form == 2:
        headers += [(b"x-api-key", b"k%d" % i) for i in range(r.choice([2, 50, 500]))]
    else:
        headers += [(b"x-forwarded-for", b"10.0.0.%d" % (i % 256)) for i in range(200)]
    return _post("big_headers", v1, body, headers)


#: bodies a careless model trips on and the guard refuses on the model's own routes, by
#: format: what a path spelling or an HTTP oddity carries, so that a crash behind the guard
#: shows that the spelling went round it
_TRIPS = {
    "v2": [
        b'{"inputs":[{"name":"input-0","shape":[1,2],"datatype":"FP32","data":[1,NaN]}]}',
        b'{"inputs":[{"name":"input-0","shape":[2,2],"datatype":"FP32","data":[1,2,3]}]}',
        b'{"inputs":[{"name":"input-0","shape":[1,2],"datatype":"FP32","data":[1,"x"]}]}',
    ],
    "v1": [
        b'{"instances":[[1,NaN]]}',
        b'{"instances":[[1,-Infinity]]}',
        b'{"instances":[["x",2]]}',
    ],
}
_PATH_VARIANTS = {
    "v2": [
        "/v2/models/{m}/infer/",
        "/v2/models/{m}/versions/1/infer",
        "/v2/models/{m}/infer?x=1",
        "/v2/models/{m}/%69nfer",
        "/v2/models/{m}%2Finfer",
        "/v2/models/{M}/infer",
        "/v2//models/{m}/infer",
        "//v2/models/{m}/infer",
        "/v2/models/{m}/./infer",
        "/v2/models/x/../{m}/infer",
        "/v2/models/{m}/infer;a=b",
        "/v2/models/{m}/infer%00",
    ],
    "v1": [
        "/v1/models/{m}:predict/",
        "/v1/models/{m}%3Apredict",
        "/v1/models/{m}:predict?",
        "/v1/models/{m}:PREDICT",
        "/v1/models/{m}:predict:predict",
        "/v1/models/{m}::predict",
        "/v1/models/a/{m}:predict",
    ],
}


def route_variants(r: random.Random, model: str) -> HostileRequest:
    """A body that trips a careless model, sent to a spelling of its route."""
    fmt = r.choice(["v2", "v1"])
    path = r.choice(_PATH_VARIANTS[fmt]).format(m=model, M=model.upper())
    return _post("route_variants", path, r.choice(_TRIPS[fmt]))


def _raw(
    start: bytes,
    lines: list[bytes],
    body: bytes = b"",
    *,
    length: bool = True,
    connection: bytes = b"close",
) -> bytes:
    head = [start, b"host: hostile.test", b"connection: " + connection, *lines]
    if length:
        head.append(b"content-length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _raw_cases(r: random.Random, model: str) -> dict[str, bytes]:
    v2, v1 = (p.encode() for p in _routes(model))
    body = r.choice(_TRIPS["v1"])
    post = b"POST %s HTTP/1.1" % v1
    ct = b"content-type: application/json"
    chunked = b"transfer-encoding: chunked"
    one_chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    ws = [b"upgrade: websocket", b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
          b"sec-websocket-version: 13"]  # fmt: skip
    return {
        # framing
        "short_length": _raw(post, [ct, b"content-length: %d" % (len(body) // 2)], body,
                             length=False),
        "length_not_a_number": _raw(post, [ct, b"content-length: 1x"], body, length=False),
        "length_plus": _raw(post, [ct, b"content-length: +%d" % len(body)], body, length=False),
        "two_lengths": _raw(post, [ct, b"content-length: 3"], body),
        "te_and_length": _raw(post, [ct, chunked], one_chunk),
        "te_gzip": _raw(post, [ct, b"transfer-encoding: gzip, chunked"], one_chunk, length=False),
        "bad_chunk_size": _raw(post, [ct, chunked], b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                               length=False),
        "chunk_extensions": _raw(post, [ct, chunked], b"%x;x=1\r\n%s\r\n0\r\nx-t: 1\r\n\r\n"
                                 % (len(body), body), length=False),
        # header syntax
        "obs_fold": _raw(post, [ct, b"x-api-key: a", b" folded"], body),
        "space_in_name": _raw(post, [ct, b"x api-key: a"], body),
        "space_before_colon": _raw(post, [ct, b"x-api-key : a"], body),
        "no_colon": _raw(post, [ct, b"x-api-key"], body),
        "nul_in_value": _raw(post, [ct, b"x-api-key: a\x00b"], body),
        "conflicting_keys": _raw(post, [ct, b"x-api-key: a", b"x-api-key: b"], body),
        # request line
        "ctl_in_target": _raw(b"POST %s\x01 HTTP/1.1" % v1, [ct], body),
        "utf8_target": _raw(b"POST %s HTTP/1.1" % v1.replace(b"/models/", "/mödels/".encode()),
                            [ct], body),
        "absolute_form": _raw(b"POST http://hostile.test%s HTTP/1.1" % v2, [ct], _TRIPS["v2"][0]),
        "http_1_0": _raw(b"POST %s HTTP/1.0" % v1, [ct], body),
        "http_2_0": _raw(b"POST %s HTTP/2.0" % v1, [ct], body),
        "long_target": _raw(b"POST %s?%s HTTP/1.1" % (v1, b"a" * 20_000), [ct], body),
        "garbage_method": _raw(b"P@ST %s HTTP/1.1" % v1, [ct], body),
        "lf_only": _raw(post, [ct], body).replace(b"\r\n", b"\n"),
        # protocol switches
        "expect_100": _raw(post, [ct, b"expect: 100-continue"], body),
        "upgrade_h2c": _raw(post, [ct, b"upgrade: h2c", b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA"
                                   ], body, connection=b"upgrade, http2-settings"),
        "upgrade_websocket": _raw(b"GET %s HTTP/1.1" % v2, ws, length=False, connection=b"upgrade"),
        "tls_hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"
        + bytes(r.getrandbits(8) for _ in range(64)),
    }  # fmt: skip


#: the names of :func:`raw_http`'s cases, in the order it draws from
RAW_CASES: tuple[str, ...] = tuple(_raw_cases(random.Random(0), "m"))


def raw_http(r: random.Random, model: str) -> HostileRequest:
    """HTTP a client library would not send: bad framing, bad header syntax, odd forms."""
    name = r.choice(RAW_CASES)
    raw = _raw_cases(r, model)[name]
    _, v1 = _routes(model)
    return HostileRequest(f"raw_http:{name}", "POST", v1, [], [], raw=raw)


#: every kind of the corpus: name -> (share of the corpus, generator)
KINDS: dict[str, tuple[float, Callable[[random.Random, str], HostileRequest]]] = {
    "fuzz": (0.55, fuzz_request),
    "benign": (0.03, benign),
    "wrong_width": (0.05, wrong_width),
    "kserve_v1_types": (0.05, kserve_v1_types),
    "oip_types": (0.05, oip_types),
    "bytes_to_fp32": (0.04, bytes_to_fp32),
    "openai_types": (0.03, openai_types),
    "nan_inf": (0.04, nan_inf),
    "extreme_finite": (0.02, extreme_finite),
    "encoding": (0.03, encoding),
    "deep": (0.02, deep),
    "huge": (0.005, huge),
    "big_headers": (0.025, big_headers),
    "route_variants": (0.03, route_variants),
    "raw_http": (0.03, raw_http),
}


def build(seed: int, i: int, *, model: str = "digits") -> HostileRequest:
    """Request ``i`` of the corpus for ``seed``, drawn from its own RNG."""
    r = random.Random(f"hostile:{seed}:{i}")
    names = list(KINDS)
    name = r.choices(names, weights=[KINDS[k][0] for k in names])[0]
    return KINDS[name][1](r, model)


def corpus(seed: int, n: int, *, model: str = "digits") -> Iterator[HostileRequest]:
    """The first ``n`` requests of the corpus for ``seed``."""
    for i in range(n):
        yield build(seed, i, model=model)
