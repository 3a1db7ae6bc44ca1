"""Configuration: one YAML file that ops teams edit, validated by key path.

``GuardConfig.load`` accepts a path, a mapping or a ``GuardConfig``. Every
problem is reported with its dotted key path (``policies[0].detectors[1].action``):
unknown keys and wrong types are errors, never silently ignored. With no config
at all, :meth:`GuardConfig.default` gives safe defaults: payload validation on
every well-known inference route, metrics at ``/metrics``, the audit log on
stderr, ``fail_open``.

The file format is documented in README.md ("Configuration reference").
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from inference_guard.guard.decisions import Action, FailureMode
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.pointer import parse_pointer

__all__ = [
    "DEFAULT_ROUTES",
    "IDENTITY_SOURCES",
    "OIP_DATATYPES",
    "SHARED_STORE_SCHEMES",
    "AuditConfig",
    "CaptureConfig",
    "DegradeConfig",
    "DetectorSpec",
    "ExemptConfig",
    "GuardConfig",
    "IdentityConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ObservationConfig",
    "PayloadConfig",
    "PolicyConfig",
    "SignatureConfig",
    "StateConfig",
    "TensorSpec",
]

#: the inference routes of the protocols the guard understands (README, "Decision semantics")
DEFAULT_ROUTES: tuple[str, ...] = (
    "/v2/models/*/infer",
    "/v2/models/*/versions/*/infer",
    "/v1/models/*:predict",
    "/v1/models/*:classify",
    "/v1/models/*:regress",
    "/invocations",
    "/v1/chat/completions",
    "/v1/completions",
)


#: the shortest secret accepted in ``client_identity.hash_key_env``
MIN_HASH_KEY_BYTES = 16

#: ``state.store`` schemes shared by every worker and replica (Redis, Redis Cluster)
SHARED_STORE_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
)


def short_hash_key(env: str) -> str:
    """The problem with a secret in ``env`` shorter than :data:`MIN_HASH_KEY_BYTES`."""
    return (
        f"environment variable {env} must hold at least {MIN_HASH_KEY_BYTES} bytes "
        "(a random secret: openssl rand -hex 32)"
    )


#: the credentials ``client_identity.source`` may name, and the address (always last)
IDENTITY_SOURCES: tuple[str, ...] = ("api_key", "bearer", "ip")


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """How a client is identified. Raw keys are only ever kept as keyed hashes.

    ``source`` names the credentials the app authenticates; the rule is in
    :mod:`guard.identity`. A credential the list does not name is never read, so
    it never makes a new identity.
    """

    #: the credentials that identify a client (``api_key``, ``bearer``), then ``ip``, the
    #: address, for a request that presents none of them (always last, always there)
    source: tuple[str, ...] = ("api_key", "bearer", "ip")
    #: headers that carry an API key (source ``api_key``)
    api_key_headers: tuple[str, ...] = ("x-api-key",)
    #: read ``Authorization: Bearer <token>`` (source ``bearer``); ``false`` takes
    #: ``bearer`` out of the default ``source``
    bearer: bool = True
    #: prefix length of an IPv4 client's subnet (rate ``key: subnet``, ``quarantine_address``)
    subnet_ipv4: int = 24
    #: prefix length of an IPv6 client's subnet
    subnet_ipv6: int = 64
    #: environment variable holding the secret for hashing client ids (HMAC-SHA256)
    hash_key_env: str = "GUARD_HASH_KEY"
    #: CIDRs of reverse proxies whose forwarded header is honoured
    trusted_proxies: tuple[str, ...] = ()
    #: the forwarded-for header to read from trusted proxies
    forwarded_header: str = "x-forwarded-for"
    #: answer 400 when a peer that is not a trusted proxy sends the forwarded header
    reject_untrusted_forwarded: bool = True


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds on what the guard will parse. Past them, a clear 4xx."""

    max_body_bytes: int = 1 << 20  #: larger bodies get 413
    max_json_depth: int = 32  #: deeper nesting gets 400
    max_rows: int = 1024  #: more rows in one request get 413
    max_features: int = 1 << 16  #: wider rows get 400
    max_text_chars: int = 100_000  #: longer prompts (all texts together) get 413
    max_response_bytes: int = 8 << 20  #: answers larger than this are not parsed (passed through)
    #: seconds for the whole body to arrive once the guard starts reading it; 408 past that
    body_timeout_s: float = 5.0
    #: JSON lists and objects in one body, counted before decoding; 413 past it. A list
    #: is the dearest value to decode: 1024 rows of lists fit, a million do not
    max_json_containers: int = 1 << 13
    #: JSON object keys in one body, counted before decoding; 413 past it (1024 MLflow
    #: records of 16 columns fit, with 1024 keys to spare; a key costs about what a list does)
    max_json_keys: int = 17 << 10
    #: JSON values in one body, scalars and containers, counted before decoding; 413 past it
    max_json_elements: int = 1 << 17
    #: numbers in one request's matrix, rows x features (each numeric OIP tensor on its
    #: own), checked before the matrix is built; 413 past it (1024 rows of 64 fit)
    max_values: int = 1 << 16
    #: bodies larger than this are parsed in a worker thread, off the event loop
    offload_bytes: int = 1 << 16
    #: seconds an offloaded parse may take, queueing included; 503 ``parse_timeout`` past it
    parse_timeout_s: float = 1.0


@dataclass(frozen=True, slots=True)
class ObservationConfig:
    """The observation queue: answers on their way to the detectors that learn from them.

    The detectors that learn from the model's answers (``prada``, ``boundary``)
    judge the client's *next* requests, so the guard queues what they must see
    and applies it in batches, off the request that was answered. An
    observation is applied at the latest when the next request of the same
    client, address or subnet is judged, when ``batch`` are waiting, or
    ``max_delay_s`` after it was queued, whichever comes first, and whatever is
    left at the server's lifespan shutdown (README, "The observation queue").
    Read at start-up and on reload.
    """

    #: observations applied together; 1 applies each at once, after its answer (no queue)
    batch: int = 32
    #: observations waiting at most; one more is dropped, counted in
    #: ``guard_observations_dropped_total`` (only a stalled store lets the queue fill)
    max_pending: int = 4096
    #: bytes the waiting observations may hold at most (their rows, answers and texts,
    #: estimated); past it an observation is dropped and counted the same way
    max_pending_bytes: int = 64 * 1024 * 1024
    #: seconds an observation may wait for a batch when nothing else drains the queue
    max_delay_s: float = 0.02

    @property
    def queued(self) -> bool:
        return self.batch > 1


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics."""

    enabled: bool = True
    #: path the middleware serves the exposition on; empty string disables the endpoint
    path: str = "/metrics"
    #: networks whose clients may scrape ``path``; anyone else finds no endpoint there
    #: (the request goes on to the app). The metrics name the detectors that fired, so
    #: they are not for the clients being watched: loopback only by default. Private
    #: ranges are no proof of a scraper: behind SNAT or a load balancer every client
    #: arrives from one
    allow_from: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: histogram buckets for guard_overhead_seconds
    overhead_buckets: tuple[float, ...] = (
        1e-5,
        2.5e-5,
        5e-5,
        1e-4,
        2.5e-4,
        5e-4,
        1e-3,
        2.5e-3,
        5e-3,
        1e-2,
        2.5e-2,
        0.1,
    )


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The audit log: one JSON line per non-allow decision."""

    enabled: bool = True
    #: file path, or ``-`` for stderr
    path: str = "-"


@dataclass(frozen=True, slots=True)
class ExemptConfig:
    """Clients that are counted and logged but never enforced against.

    For synthetic monitors and load tests. Every detector still runs on their
    requests and is counted; the enforced action is always ``allow``, and they
    are never quarantined nor refused by an existing quarantine. API keys are
    listed as ``sha256:<64 hex digits>`` of the raw key, never the key itself
    (``printf %s KEY | guard hash-key``).
    """

    #: SHA-256 digests of exempt API keys or bearer tokens, lower-case hex (no prefix)
    api_keys: tuple[str, ...] = ()
    #: networks whose clients (the resolved address, as for identity) are exempt
    cidrs: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.cidrs)


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Recording traffic for ``guard replay``: one JSON line per sampled request.

    Off unless ``path`` is set. The file holds inputs and the model's answers:
    it is sensitive data, created with permissions 0600.
    """

    #: the JSON-lines file to append to; ``None``: no capture
    path: str | None = None
    #: share of clients recorded (chosen by client, so a session is kept whole)
    sample: float = 1.0
    #: lines queued for the writer thread at most; beyond, lines are dropped and counted
    max_queue: int = 10_000

    @property
    def enabled(self) -> bool:
        return self.path is not None and self.sample > 0.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where per-client state lives (rate counters, quarantine, detector history)."""

    #: ``memory://`` (per process) or ``redis://host:port/db`` / ``rediss://`` /
    #: ``unix://`` / ``redis+cluster://host:port,host:port`` / ``rediss+cluster://`` (shared)
    store: str = "memory://"
    #: memory store: most keys tracked before least-recently-used eviction
    max_keys: int = 100_000
    #: memory store: most quarantine flags and detector standings, kept apart from
    #: ``max_keys`` and never evicted while their TTL runs (past it, new flags overflow
    #: into the main table, counted in guard_store_flag_overflows_total)
    max_flag_keys: int = 100_000
    #: prefix for every key the guard writes to a shared store
    key_prefix: str = "guard:"
    #: seconds a store operation may take before it counts as failed (queueing
    #: included); a failure is a fail-open bypass or a fail-closed refusal, so
    #: this sits well above a loaded host's latency spikes. A dead store costs it
    #: only until the circuit breaker opens.
    timeout_s: float = 0.25
    #: consecutive failures that open the circuit breaker
    breaker_failures: int = 5
    #: seconds the breaker stays open before one trial request
    breaker_reset_s: float = 5.0


@dataclass(frozen=True, slots=True)
class DegradeConfig:
    """How answers are coarsened.

    With ``always`` (the default) every answer of the policy is coarsened
    (``decimals``, ``top_k``, ``labels_only``): rounding to 2 decimals is what
    keeps equation-solving extraction from exact agreement in the rows it gets
    before the extraction detectors step in (benchmarks/RESULTS.md, "attacks"). Clients a detector
    asked to ``degrade`` get the same coarsening plus ``noise``.
    """

    #: round probabilities to this many decimals (``None``: keep them)
    decimals: int | None = 2
    #: keep only the k most probable classes (``None``: all)
    top_k: int | None = None
    #: drop probabilities altogether, answer labels only
    labels_only: bool = False
    #: coarsen every answer of this policy, not only degraded clients'
    always: bool = True
    #: for degraded clients only: standard deviation of random noise added to the
    #: probabilities before the argmax, so answers near the decision boundary flip at
    #: random (breaks decision-based attacks such as HopSkipJump and Boundary); 0: none
    noise: float = 0.1


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """One detector in a policy."""

    #: registered detector type (``rate``, ``mahalanobis``, ...)
    type: str
    #: instance name, used in metrics and the audit log; defaults to ``type``
    name: str
    #: what the policy does when this detector fires
    action: Action = Action.FLAG
    #: the detector's own parameters, validated by its factory
    params: Mapping[str, Any] = field(default_factory=dict)
    #: stronger actions for lower scores: ``(score_below, action)``, e.g. degrade when
    #: the detector fires, quarantine (``block``) once its score falls below -5
    escalate: tuple[tuple[float, Action], ...] = ()
    #: the same relative to the detector's (calibrated) threshold: ``(margin_below,
    #: action)`` applies when ``score - threshold < margin_below``
    escalate_margin: tuple[tuple[float, Action], ...] = ()
    #: key path of this spec in the config file, for the factory's error messages
    key: str = ""


@dataclass(frozen=True, slots=True)
class PayloadConfig:
    """A custom JSON shape: where a route's requests and answers keep what the guard reads.

    Each field is a JSON pointer (RFC 6901, ``/features``), ``None`` when not
    declared; at least one of ``rows`` and ``texts`` is. Requests on the
    policy's routes are then read through these pointers only.
    """

    #: the rows (a list of rows of numbers, or one row) in a request
    rows: str | None = None
    #: the prompt texts (a string or a list of strings) in a request
    texts: str | None = None
    #: the class probabilities (a list of rows, or one row) in an answer
    probabilities: str | None = None


#: the Open Inference Protocol's tensor datatypes
OIP_DATATYPES: frozenset[str] = frozenset(
    {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
        "BYTES",
    }
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input tensor of a model's signature (OIP v2 metadata's ``inputs[]``)."""

    name: str
    #: an OIP datatype (:data:`OIP_DATATYPES`)
    datatype: str
    #: dimensions; ``-1`` matches any size
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SignatureConfig:
    """The inputs an OIP v2 model takes, checked before the model runs (400 ``bad_type``,
    ``bad_shape``): learned from ``GET /v2/models/{name}`` or given here."""

    #: learn each model's inputs from its metadata endpoint (``learn: true``)
    learn: bool = False
    #: seconds a learned signature (or a failed lookup) is kept
    ttl_s: float = 300.0
    #: the inputs of every model on the policy's routes, given instead of learned
    inputs: tuple[TensorSpec, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.learn or bool(self.inputs)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Route patterns, the detectors that guard them, and what happens when they fire."""

    name: str
    #: path patterns: ``*`` matches within one path segment, ``**`` across segments
    routes: tuple[str, ...] = DEFAULT_ROUTES
    #: HTTP methods the policy applies to
    methods: tuple[str, ...] = ("POST",)
    #: check payloads (content type, JSON, shapes, NaN/Inf, limits) before the model
    validate: bool = True
    detectors: tuple[DetectorSpec, ...] = ()
    #: record what would have happened, but allow everything
    shadow: bool = False
    #: seconds a blocked client stays blocked (0: no quarantine)
    quarantine_s: float = 0.0
    #: the address layer quarantined with a client: its ``ip``, its ``subnet``
    #: (``client_identity.subnet_ipv4``/``subnet_ipv6``), or ``off``. Whatever
    #: credential a request then presents, from there it is refused
    quarantine_address: Literal["ip", "subnet", "off"] = "ip"
    #: seconds the address stays quarantined (``None``: ``quarantine_s``)
    quarantine_address_s: float | None = None
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    #: overrides the global failure mode for this policy
    failure_mode: FailureMode | None = None
    #: the custom JSON shape of the policy's routes (``None``: the built-in formats)
    payload: PayloadConfig | None = None
    #: a request of no known format: ``pass`` it on (warned once per route) or ``refuse`` it
    unknown_format: Literal["pass", "refuse"] = "pass"
    #: the OIP v2 models' input signatures (off by default)
    signature: SignatureConfig = field(default_factory=SignatureConfig)


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The whole configuration. Build it with :meth:`load`, :meth:`from_dict` or :meth:`default`."""

    policies: tuple[PolicyConfig, ...] = (PolicyConfig(name="inference"),)
    client_identity: IdentityConfig = field(default_factory=IdentityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    state: StateConfig = field(default_factory=StateConfig)
    failure_mode: FailureMode = FailureMode.FAIL_OPEN
    #: directory of calibrated detector files (``guard calibrate --out``)
    calibration_dir: str | None = None
    #: clients never enforced against (monitors, load tests)
    exempt: ExemptConfig = field(default_factory=ExemptConfig)
    #: traffic recording for ``guard replay`` (off by default)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    #: the observation queue (answers for the detectors that learn from them)
    observation: ObservationConfig = field(default_factory=ObservationConfig)

    @classmethod
    def default(cls) -> GuardConfig:
        return cls()

    @classmethod
    def load(
        cls, source: str | os.PathLike[str] | Mapping[str, Any] | GuardConfig | None
    ) -> GuardConfig:
        """Build a config from a YAML path, a mapping, a config, or ``None`` (defaults)."""
        if source is None:
            return cls.default()
        if isinstance(source, GuardConfig):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        return cls.from_file(source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GuardConfig:
        p = Path(path)
        return _relative_to(cls.from_dict(_read_mapping(p)), p)

    @classmethod
    def check_file(
        cls, path: str | os.PathLike[str]
    ) -> tuple[GuardConfig | None, list[tuple[str, str]]]:
        """Every problem of a config file's structure, and the config as far as it parsed.

        For ``guard check-config``: the config comes back even when there are
        problems (a faulty value replaced by its default), so that what depends
        on it (each detector's parameters, built by its factory) can be checked
        too and every problem in the file reported at once. Such a config is
        for checking only, never for running. ``None`` when the file cannot be
        read as a YAML mapping at all.
        """
        p = Path(path)
        try:
            data = _read_mapping(p)
        except ConfigurationError as exc:
            return None, list(exc.problems)
        v = _Validator()
        cfg = v.guard(data)
        return (None if cfg is None else _relative_to(cfg, p)), list(v.problems)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuardConfig:
        """Validate a mapping; raise one :class:`ConfigurationError` listing every problem."""
        v = _Validator()
        cfg = v.guard(data)
        if v.problems:
            key, problem = v.problems[0]
            raise ConfigurationError(key, problem, problems=v.problems)
        assert cfg is not None  # no problems means every section parsed
        return cfg


def _read_mapping(p: Path) -> Mapping[str, Any]:
    """The YAML mapping in a config file; :class:`ConfigurationError` if there is none."""
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError("", f"config file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError("", f"cannot read config file {str(p)!r}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError("", f"{str(p)!r} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigurationError("", "the top level of the config must be a mapping")
    return data


def _relative_to(cfg: GuardConfig, p: Path) -> GuardConfig:
    if cfg.calibration_dir is not None and not Path(cfg.calibration_dir).is_absolute():
        # relative calibration paths are relative to the config file, not the cwd
        resolved = str((p.parent / cfg.calibration_dir).resolve())
        cfg = _replace(cfg, calibration_dir=resolved)
    return cfg


def _replace(cfg: GuardConfig, **changes: Any) -> GuardConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


# --------------------------------------------------------------------------- validation

T = TypeVar("T")
_MISSING = object()


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)


class _Validator:
    """Walks the raw mapping, collecting every problem with its key path."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, key: str, problem: str) -> None:
        self.problems.append((key, problem))

    # -- scalar readers: return the default (and record a problem) on a bad value

    def mapping(self, raw: object, key: str, allowed: set[str]) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.fail(key or "<top>", f"must be a mapping, got {_type_name(raw)}")
            return {}
        for k in raw:
            if not isinstance(k, str):
                self.fail(key or "<top>", f"keys must be strings, got {k!r}")
            elif k not in allowed:
                self.fail(_join(key, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return raw

    def boolean(self, m: Mapping[str, Any], key: str, name: str, default: bool) -> bool:
        value = m.get(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(_join(key, name), f"must be true or false, got {_type_name(value)}")
            return default
        return value

    def integer(
        self, m: Mapping[str, Any], key: str, name: str, default: int, *, minimum: int = 0
    ) -> int:
        value = m.get(name, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(_join(key, name), f"must be an integer, got {_type_name(value)}")
            return default
        if value < minimum:
            self.fail(_join(key, name), f"must be >= {minimum}, got {value}")
            return default
        return value

    def number(
        self, m: Mapping[str, Any], key: str, name: str, default: float, *, minimum: float = 0.0
    ) -> float:
        value = m.get(name, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(_join(key, name), f"must be a number, got {_type_name(value)}")
            return default
        if not (float(value) >= minimum) or float(value) == float("inf"):
            self.fail(_join(key, name), f"must be a finite number >= {minimum}, got {value}")
            return default
        return float(value)

    def string(
        self, m: Mapping[str, Any], key: str, name: str, default: str, *, nonempty: bool = False
    ) -> str:
        value = m.get(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.fail(_join(key, name), f"must be a string, got {_type_name(value)}")
            return default
        if nonempty and not value.strip():
            self.fail(_join(key, name), "must not be empty")
            return default
        return value

    def strings(
        self,
        m: Mapping[str, Any],
        key: str,
        name: str,
        default: tuple[str, ...],
        *,
        check: Callable[[str, str], str | None] | None = None,
        nonempty: bool = False,
    ) -> tuple[str, ...]:
        value = m.get(name, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(_join(key, name), f"must be a list of strings, got {_type_name(value)}")
            return default
        out: list[str] = []
        before = len(self.problems)
        for i, item in enumerate(value):
            item_key = f"{_join(key, name)}[{i}]"
            if not isinstance(item, str):
                self.fail(item_key, f"must be a string, got {_type_name(item)}")
                continue
            if check is not None:
                problem = check(item_key, item)
                if problem:
                    self.fail(item_key, problem)
                    continue
            out.append(item)
        if nonempty and not out and len(self.problems) == before:
            self.fail(_join(key, name), "must not be empty")
        return tuple(out)

    def choice(self, m: Mapping[str, Any], key: str, name: str, enum: type[T], default: T) -> T:
        value = m.get(name, _MISSING)
        if value is _MISSING:
            return default
        try:
            return enum(value)  # type: ignore[call-arg]
        except (ValueError, TypeError):
            allowed = ", ".join(str(e) for e in enum)  # type: ignore[attr-defined]
            self.fail(_join(key, name), f"must be one of {allowed}, got {value!r}")
            return default

    # -- sections

    def guard(self, data: Mapping[str, Any]) -> GuardConfig | None:
        top = self.mapping(
            data,
            "",
            {
                "policies",
                "client_identity",
                "limits",
                "metrics",
                "audit",
                "state",
                "failure_mode",
                "calibration_dir",
                "exempt",
                "capture",
                "observation",
            },
        )
        identity = self.identity(top.get("client_identity"), "client_identity")
        observation = self.observation(top.get("observation"), "observation")
        exempt = self.exempt(top.get("exempt"), "exempt")
        capture = self.capture(top.get("capture"), "capture")
        limits = self.limits(top.get("limits"), "limits")
        metrics = self.metrics(top.get("metrics"), "metrics")
        audit = self.audit(top.get("audit"), "audit")
        state = self.state(top.get("state"), "state")
        failure_mode = self.choice(top, "", "failure_mode", FailureMode, FailureMode.FAIL_OPEN)
        calibration_dir = top.get("calibration_dir")
        if calibration_dir is not None and not isinstance(calibration_dir, str):
            self.fail("calibration_dir", f"must be a string, got {_type_name(calibration_dir)}")
            calibration_dir = None
        if "policies" in top:
            policies = self.policies(top["policies"], "policies")
        else:
            policies = (PolicyConfig(name="inference"),)
        if state.store.startswith(SHARED_STORE_SCHEMES) and not os.environ.get(
            identity.hash_key_env
        ):
            # with a shared store every worker must hash a client to the same id
            self.fail(
                "client_identity.hash_key_env",
                f"environment variable {identity.hash_key_env} must be set when state.store is "
                "shared (redis), so that every worker and replica hashes clients alike",
            )
        hash_key = os.environ.get(identity.hash_key_env)
        if hash_key and len(hash_key.encode("utf-8")) < MIN_HASH_KEY_BYTES:
            # the value is a secret: say how long it must be, never what it is
            self.fail("client_identity.hash_key_env", short_hash_key(identity.hash_key_env))
        return GuardConfig(
            policies=policies,
            client_identity=identity,
            limits=limits,
            metrics=metrics,
            audit=audit,
            state=state,
            failure_mode=failure_mode,
            calibration_dir=calibration_dir,
            exempt=exempt,
            capture=capture,
            observation=observation,
        )

    def observation(self, raw: object, key: str) -> ObservationConfig:
        m = self.mapping(raw, key, {"batch", "max_pending", "max_pending_bytes", "max_delay_s"})
        d = ObservationConfig()
        batch = self.integer(m, key, "batch", d.batch, minimum=1)
        max_pending = self.integer(m, key, "max_pending", max(d.max_pending, batch), minimum=1)
        if max_pending < batch:
            self.fail(_join(key, "max_pending"), f"must be >= batch ({batch}), got {max_pending}")
            max_pending = batch
        return ObservationConfig(
            batch=batch,
            max_pending=max_pending,
            max_pending_bytes=self.integer(
                m, key, "max_pending_bytes", d.max_pending_bytes, minimum=1
            ),
            max_delay_s=self.number(m, key, "max_delay_s", d.max_delay_s, minimum=0.0),
        )

    def exempt(self, raw: object, key: str) -> ExemptConfig:
        m = self.mapping(raw, key, {"api_keys", "cidrs"})
        keys = self.strings(m, key, "api_keys", (), check=_check_key_hash)
        return ExemptConfig(
            api_keys=tuple(dict.fromkeys(k.removeprefix("sha256:").lower() for k in keys)),
            cidrs=self.strings(m, key, "cidrs", (), check=_check_cidr),
        )

    def capture(self, raw: object, key: str) -> CaptureConfig:
        m = self.mapping(raw, key, {"path", "sample", "max_queue"})
        d = CaptureConfig()
        path: str | None = None
        if "path" in m and m["path"] is not None:
            path = self.string(m, key, "path", "", nonempty=True) or None
        elif m:
            self.fail(_join(key, "path"), "is required to capture (omit capture: to turn it off)")
        sample = self.number(m, key, "sample", d.sample)
        if sample > 1.0:
            self.fail(_join(key, "sample"), f"must be between 0 and 1, got {sample}")
            sample = d.sample
        return CaptureConfig(
            path=path,
            sample=sample,
            max_queue=self.integer(m, key, "max_queue", d.max_queue, minimum=1),
        )

    def identity(self, raw: object, key: str) -> IdentityConfig:
        m = self.mapping(
            raw,
            key,
            {
                "source",
                "api_key_headers",
                "bearer",
                "subnet_ipv4",
                "subnet_ipv6",
                "hash_key_env",
                "trusted_proxies",
                "forwarded_header",
                "reject_untrusted_forwarded",
            },
        )
        d = IdentityConfig()
        headers = self.strings(m, key, "api_key_headers", d.api_key_headers, check=_check_header)
        bearer = self.boolean(m, key, "bearer", d.bearer)
        return IdentityConfig(
            source=self.sources(m, key, headers, bearer),
            api_key_headers=tuple(h.lower() for h in headers),
            bearer=bearer,
            subnet_ipv4=self.prefix_length(m, key, "subnet_ipv4", d.subnet_ipv4, 32),
            subnet_ipv6=self.prefix_length(m, key, "subnet_ipv6", d.subnet_ipv6, 128),
            hash_key_env=self.string(m, key, "hash_key_env", d.hash_key_env, nonempty=True),
            trusted_proxies=self.strings(
                m, key, "trusted_proxies", d.trusted_proxies, check=_check_cidr
            ),
            forwarded_header=self.string(
                m, key, "forwarded_header", d.forwarded_header, nonempty=True
            ).lower(),
            reject_untrusted_forwarded=self.boolean(
                m, key, "reject_untrusted_forwarded", d.reject_untrusted_forwarded
            ),
        )

    def sources(
        self, m: Mapping[str, Any], key: str, headers: tuple[str, ...], bearer: bool
    ) -> tuple[str, ...]:
        """``client_identity.source``, checked, with ``ip`` last (see :mod:`guard.identity`).

        Without it, the sources the legacy keys enable: ``api_key`` when
        ``api_key_headers`` names a header, ``bearer`` unless ``bearer: false``.
        """
        sk = _join(key, "source")
        if "source" not in m:
            legacy = ("api_key",) if headers else ()
            return (*legacy, *(("bearer",) if bearer else ()), "ip")
        raw = m["source"]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            self.fail(sk, f"must be one of {', '.join(IDENTITY_SOURCES)} or a list of them")
            return IdentityConfig().source
        out: list[str] = []
        for i, item in enumerate(items):
            ik = f"{sk}[{i}]" if isinstance(raw, list) else sk
            if item not in IDENTITY_SOURCES:
                self.fail(ik, f"must be one of {', '.join(IDENTITY_SOURCES)}, got {item!r}")
            elif item in out:
                self.fail(ik, f"{item!r} is listed twice")
            elif "ip" in out:
                self.fail(
                    ik,
                    "ip must come last: the address identifies every request, so a source "
                    "after it would never be read",
                )
            else:
                out.append(item)
        if "api_key" in out and not headers:
            self.fail(sk, "names api_key, but api_key_headers is empty")
        if "bearer" in out and not bearer:
            self.fail(sk, "names bearer, but bearer is false")
        if "ip" not in out:
            out.append("ip")
        return tuple(out)

    def prefix_length(
        self, m: Mapping[str, Any], key: str, name: str, default: int, bits: int
    ) -> int:
        value = self.integer(m, key, name, default, minimum=1)
        if value > bits:
            self.fail(_join(key, name), f"must be a prefix length of 1 to {bits}, got {value}")
            return default
        return value

    def limits(self, raw: object, key: str) -> LimitsConfig:
        m = self.mapping(
            raw,
            key,
            {
                "max_body_bytes",
                "max_json_depth",
                "max_rows",
                "max_features",
                "max_text_chars",
                "max_response_bytes",
                "body_timeout_s",
                "max_json_containers",
                "max_json_keys",
                "max_json_elements",
                "max_values",
                "offload_bytes",
                "parse_timeout_s",
            },
        )
        d = LimitsConfig()
        return LimitsConfig(
            max_body_bytes=self.integer(m, key, "max_body_bytes", d.max_body_bytes, minimum=1),
            max_json_depth=self.integer(m, key, "max_json_depth", d.max_json_depth, minimum=2),
            max_rows=self.integer(m, key, "max_rows", d.max_rows, minimum=1),
            max_features=self.integer(m, key, "max_features", d.max_features, minimum=1),
            max_text_chars=self.integer(m, key, "max_text_chars", d.max_text_chars, minimum=1),
            max_response_bytes=self.integer(
                m, key, "max_response_bytes", d.max_response_bytes, minimum=0
            ),
            body_timeout_s=self.number(m, key, "body_timeout_s", d.body_timeout_s, minimum=0.001),
            max_json_containers=self.integer(
                m, key, "max_json_containers", d.max_json_containers, minimum=1
            ),
            max_json_keys=self.integer(m, key, "max_json_keys", d.max_json_keys, minimum=1),
            max_json_elements=self.integer(
                m, key, "max_json_elements", d.max_json_elements, minimum=1
            ),
            max_values=self.integer(m, key, "max_values", d.max_values, minimum=1),
            offload_bytes=self.integer(m, key, "offload_bytes", d.offload_bytes, minimum=0),
            parse_timeout_s=self.number(
                m, key, "parse_timeout_s", d.parse_timeout_s, minimum=0.001
            ),
        )

    def metrics(self, raw: object, key: str) -> MetricsConfig:
        m = self.mapping(raw, key, {"enabled", "path", "overhead_buckets", "allow_from"})
        d = MetricsConfig()
        path = self.string(m, key, "path", d.path)
        if path and not path.startswith("/"):
            self.fail(_join(key, "path"), "must start with '/' (or be empty to disable)")
            path = d.path
        buckets = d.overhead_buckets
        raw_b = m.get("overhead_buckets", _MISSING)
        if raw_b is not _MISSING:
            if (
                not isinstance(raw_b, list)
                or not raw_b
                or any(
                    isinstance(b, bool) or not isinstance(b, int | float) or b <= 0 for b in raw_b
                )
                or sorted(raw_b) != raw_b
            ):
                self.fail(
                    _join(key, "overhead_buckets"),
                    "must be a non-empty increasing list of positive numbers",
                )
            else:
                buckets = tuple(float(b) for b in raw_b)
        return MetricsConfig(
            enabled=self.boolean(m, key, "enabled", d.enabled),
            path=path,
            overhead_buckets=buckets,
            allow_from=self.strings(m, key, "allow_from", d.allow_from, check=_check_cidr),
        )

    def audit(self, raw: object, key: str) -> AuditConfig:
        m = self.mapping(raw, key, {"enabled", "path"})
        d = AuditConfig()
        return AuditConfig(
            enabled=self.boolean(m, key, "enabled", d.enabled),
            path=self.string(m, key, "path", d.path, nonempty=True),
        )

    def state(self, raw: object, key: str) -> StateConfig:
        m = self.mapping(
            raw,
            key,
            {
                "store",
                "max_keys",
                "max_flag_keys",
                "key_prefix",
                "timeout_s",
                "breaker_failures",
                "breaker_reset_s",
            },
        )
        d = StateConfig()
        store = self.string(m, key, "store", d.store, nonempty=True)
        if not store.startswith(("memory://", *SHARED_STORE_SCHEMES)):
            self.fail(
                _join(key, "store"),
                "scheme must be memory://, redis://, rediss://, unix://, redis+cluster:// "
                "or rediss+cluster://",
            )
            store = d.store
        return StateConfig(
            store=store,
            max_keys=self.integer(m, key, "max_keys", d.max_keys, minimum=1),
            max_flag_keys=self.integer(m, key, "max_flag_keys", d.max_flag_keys, minimum=1),
            key_prefix=self.string(m, key, "key_prefix", d.key_prefix),
            timeout_s=self.number(m, key, "timeout_s", d.timeout_s, minimum=0.001),
            breaker_failures=self.integer(
                m, key, "breaker_failures", d.breaker_failures, minimum=1
            ),
            breaker_reset_s=self.number(m, key, "breaker_reset_s", d.breaker_reset_s, minimum=0.0),
        )

    def policies(self, raw: object, key: str) -> tuple[PolicyConfig, ...]:
        if not isinstance(raw, list):
            self.fail(key, f"must be a list of policies, got {_type_name(raw)}")
            return ()
        out: list[PolicyConfig] = []
        seen: set[str] = set()
        for i, item in enumerate(raw):
            pk = f"{key}[{i}]"
            policy = self.policy(item, pk)
            if policy is None:
                continue
            if policy.name in seen:
                self.fail(_join(pk, "name"), f"duplicate policy name {policy.name!r}")
            seen.add(policy.name)
            out.append(policy)
        return tuple(out)

    def policy(self, raw: object, key: str) -> PolicyConfig | None:
        if not isinstance(raw, Mapping):
            self.fail(key, f"must be a mapping, got {_type_name(raw)}")
            return None
        m = self.mapping(
            raw,
            key,
            {
                "name",
                "routes",
                "methods",
                "validate",
                "detectors",
                "shadow",
                "quarantine_s",
                "quarantine_address",
                "quarantine_address_s",
                "degrade",
                "failure_mode",
                "payload",
                "unknown_format",
                "signature",
            },
        )
        name = self.string(m, key, "name", "", nonempty=True)
        if "name" not in m:
            self.fail(_join(key, "name"), "is required")
        elif name and not _is_label(name):
            self.fail(_join(key, "name"), "must be 1-64 characters of letters, digits, '_' or '-'")
        methods = self.strings(m, key, "methods", ("POST",), nonempty=True)
        detectors_raw = m.get("detectors", [])
        detectors: list[DetectorSpec] = []
        if not isinstance(detectors_raw, list):
            self.fail(_join(key, "detectors"), f"must be a list, got {_type_name(detectors_raw)}")
        else:
            names: set[str] = set()
            for j, d in enumerate(detectors_raw):
                spec = self.detector(d, f"{_join(key, 'detectors')}[{j}]")
                if spec is None:
                    continue
                if spec.name in names:
                    self.fail(
                        f"{_join(key, 'detectors')}[{j}].name",
                        f"duplicate detector name {spec.name!r}",
                    )
                names.add(spec.name)
                detectors.append(spec)
        fm_raw = m.get("failure_mode")
        failure_mode = (
            None
            if fm_raw is None
            else self.choice(m, key, "failure_mode", FailureMode, FailureMode.FAIL_OPEN)
        )
        return PolicyConfig(
            name=name,
            routes=self.strings(
                m, key, "routes", DEFAULT_ROUTES, check=_check_route, nonempty=True
            ),
            methods=tuple(x.upper() for x in methods),
            validate=self.boolean(m, key, "validate", True),
            detectors=tuple(detectors),
            shadow=self.boolean(m, key, "shadow", False),
            quarantine_s=self.number(m, key, "quarantine_s", 0.0),
            quarantine_address=self.quarantine_address(m, key),
            quarantine_address_s=(
                None
                if m.get("quarantine_address_s") is None
                else self.number(m, key, "quarantine_address_s", 0.0)
            ),
            degrade=self.degrade(m.get("degrade"), _join(key, "degrade")),
            failure_mode=failure_mode,
            payload=self.payload(m.get("payload"), _join(key, "payload")),
            unknown_format=self.unknown_format(m, key),
            signature=self.signature(m.get("signature"), _join(key, "signature")),
        )

    def quarantine_address(self, m: Mapping[str, Any], key: str) -> Literal["ip", "subnet", "off"]:
        value = m.get("quarantine_address", "ip")
        if value == "subnet":
            return "subnet"
        if value == "off" or value is False:  # YAML 1.1 reads a bare off as false
            return "off"
        if value != "ip":
            self.fail(
                _join(key, "quarantine_address"), f"must be one of ip, subnet, off, got {value!r}"
            )
        return "ip"

    def signature(self, raw: object, key: str) -> SignatureConfig:
        m = self.mapping(raw, key, {"learn", "ttl_s", "inputs"})
        learn = self.boolean(m, key, "learn", False)
        ttl_s = self.number(m, key, "ttl_s", 300.0)
        inputs: list[TensorSpec] = []
        raw_inputs = m.get("inputs", [])
        ikey = _join(key, "inputs")
        if not isinstance(raw_inputs, list):
            self.fail(ikey, f"must be a list, got {_type_name(raw_inputs)}")
            raw_inputs = []
        for j, item in enumerate(raw_inputs):
            spec = self.tensor_spec(item, f"{ikey}[{j}]")
            if spec is not None:
                if any(s.name == spec.name for s in inputs):
                    self.fail(f"{ikey}[{j}].name", f"duplicate input name {spec.name!r}")
                inputs.append(spec)
        if learn and raw_inputs:
            self.fail(key, "learn and inputs exclude each other: learn the signature or give it")
        return SignatureConfig(learn=learn, ttl_s=ttl_s, inputs=tuple(inputs))

    def tensor_spec(self, raw: object, key: str) -> TensorSpec | None:
        if not isinstance(raw, Mapping):
            self.fail(key, f"must be a mapping, got {_type_name(raw)}")
            return None
        m = self.mapping(raw, key, {"name", "datatype", "shape"})
        ok = True
        for name in ("name", "datatype", "shape"):
            if name not in m:
                self.fail(_join(key, name), "is required")
                ok = False
        name = self.string(m, key, "name", "", nonempty=True)
        datatype = m.get("datatype")
        if "datatype" in m and datatype not in OIP_DATATYPES:
            self.fail(
                _join(key, "datatype"),
                f"must be one of {', '.join(sorted(OIP_DATATYPES))}, got {datatype!r}",
            )
            ok = False
        shape = m.get("shape")
        if "shape" in m and not (
            isinstance(shape, list) and all(type(d) is int and d >= -1 for d in shape)
        ):
            self.fail(_join(key, "shape"), "must be a list of sizes (integers; -1 for any size)")
            ok = False
        if not ok or not name:
            return None
        assert isinstance(datatype, str) and isinstance(shape, list)
        return TensorSpec(name, datatype, tuple(shape))

    def payload(self, raw: object, key: str) -> PayloadConfig | None:
        if raw is None:
            return None
        m = self.mapping(raw, key, {"rows", "texts", "probabilities"})
        pointers: dict[str, str | None] = {}
        for name in ("rows", "texts", "probabilities"):
            value = m.get(name)
            if value is None:
                pointers[name] = None
                continue
            try:
                parse_pointer(value)
            except ValueError as exc:
                self.fail(_join(key, name), str(exc))
                value = None
            pointers[name] = value
        if isinstance(raw, Mapping) and m.get("rows") is None and m.get("texts") is None:
            self.fail(key, "needs rows or texts (a JSON pointer such as /features)")
        return PayloadConfig(**pointers)

    def unknown_format(self, m: Mapping[str, Any], key: str) -> Literal["pass", "refuse"]:
        value = m.get("unknown_format", "pass")
        if value == "refuse":
            return "refuse"
        if value != "pass":
            self.fail(_join(key, "unknown_format"), f"must be one of pass, refuse, got {value!r}")
        return "pass"

    def degrade(self, raw: object, key: str) -> DegradeConfig:
        m = self.mapping(raw, key, {"decimals", "top_k", "labels_only", "always", "noise"})
        d = DegradeConfig()
        decimals: int | None = d.decimals
        if "decimals" in m:
            decimals = (
                None if m["decimals"] is None else self.integer(m, key, "decimals", 2, minimum=0)
            )
        top_k: int | None = None
        if m.get("top_k") is not None:
            top_k = self.integer(m, key, "top_k", 1, minimum=1)
        return DegradeConfig(
            decimals=decimals,
            top_k=top_k,
            labels_only=self.boolean(m, key, "labels_only", d.labels_only),
            always=self.boolean(m, key, "always", d.always),
            noise=min(self.number(m, key, "noise", d.noise), 1.0),
        )

    def detector(self, raw: object, key: str) -> DetectorSpec | None:
        if isinstance(raw, str):
            raw = {"type": raw}
        if not isinstance(raw, Mapping):
            self.fail(key, f"must be a mapping (or a detector type name), got {_type_name(raw)}")
            return None
        m = self.mapping(raw, key, {"type", "name", "action", "params", "escalate"})
        if "type" not in m:
            self.fail(_join(key, "type"), "is required")
            return None
        dtype = self.string(m, key, "type", "", nonempty=True)
        if not dtype:
            return None
        name = self.string(m, key, "name", dtype, nonempty=True)
        if not _is_label(name):
            self.fail(_join(key, "name"), "must be 1-64 characters of letters, digits, '_' or '-'")
        params = m.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            self.fail(_join(key, "params"), f"must be a mapping, got {_type_name(params)}")
            params = {}
        return DetectorSpec(
            type=dtype,
            name=name,
            action=self.choice(m, key, "action", Action, Action.FLAG),
            params=dict(params),
            key=key,
            escalate=self.escalate(m.get("escalate"), _join(key, "escalate"), "score_below"),
            escalate_margin=self.escalate(
                m.get("escalate"), _join(key, "escalate"), "margin_below", report=False
            ),
        )

    def escalate(
        self, raw: object, key: str, bound: str, *, report: bool = True
    ) -> tuple[tuple[float, Action], ...]:
        """The ``bound`` entries (``score_below`` or ``margin_below``) of an escalation list.

        Each entry has exactly one of the two bounds; problems are reported by
        the ``report`` pass only, so a file's errors are listed once.
        """
        if raw is None:
            return ()
        fail = self.fail if report else (lambda _key, _problem: None)
        if not isinstance(raw, list):
            fail(
                key,
                f"must be a list of {{score_below | margin_below, action}}, got {_type_name(raw)}",
            )
            return ()
        out: list[tuple[float, Action]] = []
        for i, item in enumerate(raw):
            ik = f"{key}[{i}]"
            if not isinstance(item, Mapping):
                fail(ik, f"must be a mapping, got {_type_name(item)}")
                continue
            unknown = set(item) - {"score_below", "margin_below", "action"}
            if unknown:
                fail(
                    _join(ik, str(sorted(unknown)[0])),
                    "unknown key (allowed: score_below, margin_below, action)",
                )
                continue
            bounds = [b for b in ("score_below", "margin_below") if b in item]
            if len(bounds) != 1 or "action" not in item:
                fail(ik, "needs action and exactly one of score_below, margin_below")
                continue
            if bounds[0] != bound:
                continue
            value = item[bound]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value))
            ):
                fail(_join(ik, bound), f"must be a number, got {_type_name(value)}")
                continue
            action = item["action"]
            try:
                parsed = Action(action)
            except ValueError:
                fail(
                    _join(ik, "action"),
                    f"must be one of {', '.join(a.value for a in Action)}, got {action!r}",
                )
                continue
            out.append((float(value), parsed))
        return tuple(sorted(out))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_label(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in value)


def _check_cidr(_key: str, value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an IP network (CIDR)"
    return None


_KEY_HASH = re.compile(r"sha256:[0-9a-fA-F]{64}")


def _check_key_hash(_key: str, value: str) -> str | None:
    if _KEY_HASH.fullmatch(value):
        return None
    # never echo the value: it may be a raw API key pasted by mistake
    return (
        "must be the SHA-256 of the key, 'sha256:' and 64 hex digits, never the raw key; "
        "make it with `printf %s KEY | guard hash-key` (or `printf %s KEY | sha256sum` "
        "and prefix 'sha256:')"
    )


def _check_header(_key: str, value: str) -> str | None:
    if not value or not all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
        return f"{value!r} is not a valid header name"
    return None


def _check_route(_key: str, value: str) -> str | None:
    if not value.startswith("/"):
        return f"route pattern {value!r} must start with '/'"
    return None
