"""Everything a guard builds from its policies, as one value a reload swaps.

A :class:`Loadout` holds the config it was built from, the compiled policies
with their detectors, the admission built for them and the route memo.
:class:`guard.pipeline.Guard` keeps the running one in one attribute; a reload
(:mod:`guard.reload`) builds the next one completely, keeping the detectors
whose identity and parameters did not change, and replaces the reference. A
front end that takes the loadout once per request (``guard.loadout``) finishes
that request on it, whatever reloads meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from inference_guard.detectors.base import Detector
from inference_guard.guard.admission import Admission, RateGate
from inference_guard.guard.config import DetectorSpec, GuardConfig
from inference_guard.guard.engine import Pass, Request, Seen, Verdict
from inference_guard.guard.factory import BuildContext
from inference_guard.guard.payload.formats import PayloadFormat, payload_format
from inference_guard.guard.policy import Armed, CompiledPolicy
from inference_guard.guard.registry import build_detector
from inference_guard.guard.reload import DetectorKey, detector_key, reusable

__all__ = ["Loadout", "build_loadout"]

#: (method, path) pairs whose matching policy is remembered
_MATCH_MEMO = 1024


@dataclass(frozen=True, slots=True, eq=False)
class Loadout:
    """The policies of one config, built; see the module docstring."""

    #: the config the policies come from
    config: GuardConfig
    policies: tuple[CompiledPolicy, ...]
    #: detector name -> technique, for the audit log
    techniques: Mapping[str, str]
    #: some policy quarantines clients
    quarantine_enabled: bool
    #: the custom JSON shapes policies declare (``payload:``), by policy name
    payloads: Mapping[str, PayloadFormat]
    admission: Admission
    #: each running detector with the spec it was built from (what a reload compares)
    built: Mapping[DetectorKey, tuple[DetectorSpec, Detector]]
    #: the detectors taken over from the previous loadout, as ``policy/detector``
    kept: tuple[str, ...] = ()
    #: the detectors built for this loadout, as ``policy/detector``
    fresh: tuple[str, ...] = ()
    _match_memo: dict[tuple[str, str], CompiledPolicy | None] = field(default_factory=dict)

    def match(self, method: str, path: str) -> CompiledPolicy | None:
        """The first policy whose methods and routes match, or ``None``.

        Answers are remembered for up to :data:`_MATCH_MEMO` distinct (method,
        path) pairs; paths are client-chosen, so past that the memo stops
        growing and further paths are matched afresh.
        """
        key = (method, path)
        memo = self._match_memo
        if key in memo:
            return memo[key]
        found = None
        for policy in self.policies:
            if policy.matches(method, path):
                found = policy
                break
        if len(memo) < _MATCH_MEMO:
            memo[key] = found
        return found

    def admit(self, request: Request) -> Coroutine[Any, Any, Verdict]:
        """:meth:`Guard.admit <guard.pipeline.Guard.admit>` on this loadout's policies."""
        return self.admission.admit(request)

    def admit_fixed(self, policy: CompiledPolicy, fmt: str, n_rows: int) -> Pass:
        """:meth:`Guard.admit_fixed <guard.pipeline.Guard.admit_fixed>` on this loadout."""
        return self.admission.admit_fixed(policy, fmt, n_rows)

    def fixed_verdict(
        self, policy: CompiledPolicy, fmt: str
    ) -> tuple[Pass, Callable[[int, float | None], None]]:
        """:meth:`admit_fixed` for one ``(policy, fmt)``, bound once: the verdict and its count."""
        return self.admission.fixed_verdict(policy, fmt)

    def rate_gated(self, policy: CompiledPolicy) -> bool:
        """Whether :meth:`rate_gate` gives ``policy`` a gate."""
        return self.admission.rate_gated(policy)

    def rate_gate(self, policy: CompiledPolicy, fmt: str) -> RateGate | None:
        """:meth:`Admission.rate_gate <guard.admission.Admission.rate_gate>` of this loadout."""
        return self.admission.rate_gate(policy, fmt)

    def after(self, verdict: Pass, seen: Seen) -> Coroutine[Any, Any, None]:
        """:meth:`Guard.after <guard.pipeline.Guard.after>` on this loadout."""
        return self.admission.after(verdict, seen)

    def detectors(self) -> list[Detector]:
        """Every detector of the loadout, once each."""
        return list({id(d): d for _, d in self.built.values()}.values())


def build_loadout(
    config: GuardConfig,
    ctx: BuildContext,
    make_admission: Callable[
        [GuardConfig, tuple[CompiledPolicy, ...], Mapping[str, PayloadFormat], Mapping[str, str]],
        Admission,
    ],
    previous: Loadout | None = None,
) -> Loadout:
    """Build every policy of ``config``; raises :class:`~guard.errors.ConfigurationError`.

    With ``previous``, a detector whose policy name, detector name, type and
    parameters are unchanged is taken over as it is (:func:`guard.reload.reusable`).
    Nothing is shared with ``previous`` but the detectors kept: a failure part way
    leaves the running loadout as it was.
    """
    techniques: dict[str, str] = {}
    built: dict[DetectorKey, tuple[DetectorSpec, Detector]] = {}
    kept: list[str] = []
    fresh: list[str] = []
    policies: list[CompiledPolicy] = []
    for pc in config.policies:
        armed: list[Armed] = []
        for spec in pc.detectors:
            det = (
                reusable(previous.config, config, previous.built, pc.name, spec)
                if previous is not None
                else None
            )
            if det is None:
                det = build_detector(spec, ctx)
                fresh.append(f"{pc.name}/{spec.name}")
            else:
                kept.append(f"{pc.name}/{spec.name}")
            built[detector_key(pc.name, spec)] = (spec, det)
            techniques[det.name] = det.technique
            armed.append(Armed(det, spec.action, spec.escalate, spec.escalate_margin))
        policies.append(CompiledPolicy.build(pc, tuple(armed), config.failure_mode))
    compiled = tuple(policies)
    payloads = {p.name: f for p in config.policies if (f := payload_format(p.payload)) is not None}
    return Loadout(
        config=config,
        policies=compiled,
        techniques=techniques,
        quarantine_enabled=any(p.config.quarantine_s > 0 for p in compiled),
        payloads=payloads,
        admission=make_admission(config, compiled, payloads, techniques),
        built=built,
        kept=tuple(kept),
        fresh=tuple(fresh),
    )
