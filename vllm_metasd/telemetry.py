"""MetaSD's telemetry: phase timers, the arm-choice log and digest, the periodic
log line, and the statistics snapshot (torch/numpy-free, no vLLM import).

The snapshot (``metasd_stats``) is one plain dict with this shape, consumed by
``/metrics`` (patches/api_server.py), the log line, ``ray_replicas`` (merged
with :func:`merge_snapshots`) and the benchmarks:

    {"arms": [name, ...],
     "drafters": {name: {"chosen", "drafted", "accepted", "reward_count",
                         "reward_sum",              # sums: they add up across ranks/replicas
                         "acceptance_rate", "mean_reward"}},  # derived; None = no data
     "steps", "overhead_s", "phase_s": {phase: seconds}, "live_requests",
     "live_request_ids", "tracked_requests", "preempted", "arm_failures",
     "disabled_arms", "arm_choices": {"count", "digest"}}

``None`` is the one "no data" value (nothing drafted, never rewarded);
Prometheus renders it as NaN.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import time
from typing import Any, Iterable

from vllm_metasd.core.state import derived

logger = logging.getLogger("vllm.metasd")

# Steps of (request ids, arms) kept for learning curves in benchmarks.
CHOICE_LOG_STEPS = 4096
# MetaSD's own work per step, by phase; "forward" is the drafters' own compute,
# "probe" the drafters' passes over new prompts (prompt-informed start).
PHASES = ("hooks", "inputs", "probe", "choice", "catch_up", "forward", "validation",
          "assemble", "reward")
OWN_PHASES = tuple(p for p in PHASES if p not in ("forward", "probe"))


class Telemetry:
    def __init__(self, arm_names: list[str], log_interval_s: float):
        self.arm_names = arm_names
        self.log_interval_s = log_interval_s
        self._last_log = time.monotonic()
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.phase_s = dict.fromkeys(PHASES, 0.0)
        self.choice_log: collections.deque = collections.deque(maxlen=CHOICE_LOG_STEPS)
        self._hash = hashlib.blake2b(digest_size=8)
        self._num_choices = 0

    def add(self, phase: str, t0: float) -> float:
        """Charge the time since ``t0`` to ``phase``; returns now."""
        now = time.perf_counter()
        self.phase_s[phase] += now - t0
        return now

    @property
    def overhead_s(self) -> float:
        """All of MetaSD's own work outside the drafters' forwards."""
        return sum(self.phase_s[p] for p in OWN_PHASES)

    def record_choices(self, req_ids: list[str], arms) -> None:
        """One entry per step. The digest (order-sensitive, of every step's
        request ids and arms) must be equal on every tensor-parallel rank."""
        self.steps += 1
        self.choice_log.append((req_ids, arms))
        self._hash.update(self.steps.to_bytes(8, "little"))
        self._hash.update("\0".join(req_ids).encode())
        self._hash.update(arms.tobytes())
        self._num_choices += int((arms >= 0).sum())

    def choices(self) -> list[tuple[str, str]]:
        """The recent (request id, drafter name) choices, oldest first."""
        return [(r, self.arm_names[a]) for req_ids, arms in self.choice_log
                for r, a in zip(req_ids, arms.tolist()) if a >= 0]

    def snapshot(self, base: dict[str, Any]) -> dict[str, Any]:
        return {**base, "arms": self.arm_names, "steps": self.steps,
                "overhead_s": self.overhead_s, "phase_s": dict(self.phase_s),
                "arm_choices": {"count": self._num_choices,
                                "digest": self._hash.hexdigest()}}

    def maybe_log(self, snap_fn) -> None:
        if self.log_interval_s <= 0:
            return
        now = time.monotonic()
        if now - self._last_log < self.log_interval_s:
            return
        self._last_log = now
        logger.info("MetaSD stats: %s", format_stats_line(snap_fn()))


def format_stats_line(snap: dict[str, Any]) -> str:
    """Each drafter's share of choices and acceptance rate (cumulative, like
    the /metrics counters), and the live requests."""
    drafters = snap["drafters"]
    total = sum(d["chosen"] for d in drafters.values()) or 1
    parts = []
    for name, d in drafters.items():
        rate = d["acceptance_rate"]
        parts.append(f"{name} share {d['chosen'] / total:.0%} acceptance "
                     f"{'-' if rate is None else f'{rate:.2f}'} ({d['accepted']}/{d['drafted']})")
    return f"{'; '.join(parts)}; live requests {snap['live_requests']}"


SUMMED = ("chosen", "drafted", "accepted", "reward_count", "reward_sum")


def merge_snapshots(snaps: Iterable[dict]) -> dict:
    """Sum snapshots (replicas): counters and sums add, rates are recomputed."""
    snaps = [s for s in snaps if s is not None]
    drafters: dict[str, dict] = {}
    for s in snaps:
        for name, d in s["drafters"].items():
            m = drafters.setdefault(name, dict.fromkeys(SUMMED, 0))
            for key in SUMMED:
                m[key] += d[key]
    drafters = {name: derived(m) for name, m in drafters.items()}
    total = sum(m["chosen"] for m in drafters.values())
    for m in drafters.values():
        m["share"] = m["chosen"] / total if total else None
    return {"drafters": drafters,
            "steps": sum(s["steps"] for s in snaps),
            "overhead_s": sum(s["overhead_s"] for s in snaps),
            "live_requests": sum(s["live_requests"] for s in snaps)}
