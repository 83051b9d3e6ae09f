"""Whether a step speculates at all, from measured tokens per second (no vLLM).

The throughput objective's per-row choice rests on a cost model (target time
per verified token, each drafter group's time). What it does not see — the
rejection sampler, the scheduler's bookkeeping for drafted tokens, MetaSD's
own work per step — can still make every speculative step slower than plain
decoding (on a CPU at batch 16 and above every method measured loses to it).
The gate measures the whole thing: the wall time from one step to the next
and the tokens it yielded, for steps that drafted and steps that did not, per
batch size bucket (4-7, 8-15, 16-31, ...), and turns speculation off for a
bucket where plain steps yield more tokens per second — the way vLLM's
batch-size dynamic speculation does, learnt online instead of configured.

The gate starts once the engine has made ``warmup`` speculative steps (its
bandits' first tries of every drafter are slow and not what speculation yields
later). Then both modes are tried ``min_samples`` times before any
comparison; after that the mode that loses is still tried now and then (the
workload changes): a burst of ``burst`` steps once every ``explore_every``
steps of the bucket when the two are within 10% of each other, up to 8 times
more rarely when the winner leads by far (plain decoding at 115 tokens/s
against speculation at 215 needs little checking) and the lead is trusted:
plain steps yield one token at a steady time, so ``min_samples`` of them are
enough; speculative steps vary, so a lead over speculation waits for
``4 * min_samples`` of them. A burst, not one step: the first speculative step
after plain ones catches the drafters up on the tokens they missed, a cost of
switching, not of speculating, so the caller does not report it and the
burst's next steps are the ones measured. Every other speculative step is
reported, catch-ups of rows that changed drafters included: they are what
speculating with several drafters costs (reporting only steps without any
catch-up measured speculation at 1.1x plain decoding's rate at batch 16
where it ran at 0.6x, benchmarks/README.md "Selection").
Estimates are ratios of exponentially decayed sums (tokens over seconds) with
a memory of ~50 samples per mode, short enough to follow a workload or a
machine whose load changes.

Batches of fewer than ``min_batch`` rows are not gated: every such step goes to
the per-row choice (which can still draft nothing for a row). A small batch's
speculative yield is its one to three requests', which changes from request to
request far faster than these estimates can follow: gated, batch 1 ran plain
through requests whose drafts would have paid (measured: 0.93x and 0.94x the
ungated speed at batch 1, benchmarks/README.md "Selection"). The per-row
choice already knows each request's own yield per arm.

A cohort — requests that all started together, none joined since (an offline
``generate`` of a list of prompts, a closed batch) — is judged by another
measure, in buckets of its own: its time to finish is its slowest request's,
so a step is worth how far it advances the least-advanced request, times the
rows (plain: every row one token, the same as its tokens). Tokens a
speculative step gives the requests already ahead do not bring the end
closer: they finish sooner and the rest run in smaller, less efficient
batches (measured at batch 16: speculative steps yielded 1.25x plain's tokens
per second, yet the batches took 1.22x plain decoding's time;
benchmarks/README.md "Selection"). The proposer says which steps belong to a
cohort and credits them so.
"""
from __future__ import annotations

import math


class SpeculationGate:
    """Per bucket (a cohort's buckets after the others), plain Python numbers:
    it runs on every step, right after the model's forward has evicted the
    CPU caches, where each numpy call on a tiny array costs microseconds
    (measured: 77 -> 5 us per step at batch 16)."""

    def __init__(self, explore_every: int = 32, min_samples: int = 4, decay: float = 0.98,
                 burst: int = 4, warmup: int = 32, min_batch: int = 4, max_buckets: int = 16):
        self.explore_every, self.min_samples, self.decay = explore_every, min_samples, decay
        self.burst, self.min_batch = burst, min_batch
        self.warmup_left = warmup  # speculative steps before the gate starts
        # per bucket, per mode (0: plain, 1: speculative): decayed tokens, seconds; samples
        self.max_buckets = max_buckets
        self.tokens = [[0.0, 0.0] for _ in range(2 * max_buckets)]
        self.seconds = [[0.0, 0.0] for _ in range(2 * max_buckets)]
        self.samples = [[0, 0] for _ in range(2 * max_buckets)]
        self.decisions = [0] * (2 * max_buckets)
        self.exploring = [0] * (2 * max_buckets)  # burst steps left

    def bucket(self, batch_size: int, cohort: bool = False) -> int:
        return (min(int(batch_size).bit_length() - 1, self.max_buckets - 1)
                + self.max_buckets * cohort)

    def rate(self, batch_size: int, cohort: bool = False) -> tuple[float, float]:
        """Measured tokens/s of (plain, speculative) steps at this batch size (nan: none)."""
        b = self.bucket(batch_size, cohort)
        return tuple(t / s if s > 0 else math.nan  # type: ignore[return-value]
                     for t, s in zip(self.tokens[b], self.seconds[b]))

    def speculate(self, batch_size: int, cohort: bool = False) -> bool:
        if self.warmup_left > 0 or batch_size < self.min_batch:
            return True
        b = self.bucket(batch_size, cohort)
        self.decisions[b] += 1
        n_plain, n_spec = self.samples[b]
        if n_spec < self.min_samples:
            return True
        if n_plain < self.min_samples:
            return False
        r_plain, r_spec = self.rate(batch_size, cohort)
        best = r_spec >= r_plain
        lead = max(r_plain, r_spec) / max(min(r_plain, r_spec), 1e-9) - 1.0
        # speculative steps vary (1 to k+1 tokens), plain ones hardly: a lead over
        # speculation is trusted after 4 * min_samples of its steps
        settled = self.samples[b][int(not best)] >= self.min_samples * (1 if best else 4)
        every = self.explore_every * (min(max(int(lead / 0.1), 1), 8) if settled else 1)
        if self.decisions[b] % every == 0:
            self.exploring[b] = self.burst
        if self.exploring[b] > 0:
            self.exploring[b] -= 1
            return not best
        return best

    def snapshot(self) -> dict[str, dict]:
        """Per batch size bucket seen ("16-31", a cohort's "16-31 cohort"):
        measured tokens/s and samples of plain and speculative steps."""
        out = {}
        for b, decided in enumerate(self.decisions):
            if not decided:
                continue
            cohort, lo = b >= self.max_buckets, 1 << (b % self.max_buckets)
            r_plain, r_spec = self.rate(lo, cohort)
            name = f"{lo}-{2 * lo - 1}" if lo > 1 else "1"
            out[name + " cohort" * cohort] = {
                "plain_tokens_per_s": None if math.isnan(r_plain) else round(r_plain, 1),
                "spec_tokens_per_s": None if math.isnan(r_spec) else round(r_spec, 1),
                "plain_samples": self.samples[b][0], "spec_samples": self.samples[b][1]}
        return out

    def observe(self, batch_size: int, speculated: bool, tokens: int, seconds: float,
                cohort: bool = False) -> None:
        """A step of ``batch_size`` rows yielded ``tokens`` in ``seconds`` (wall time
        from its proposal to the next); a cohort's step: rows times the
        least-advanced request's tokens."""
        if self.warmup_left > 0:
            self.warmup_left -= speculated
            return
        if batch_size < self.min_batch:
            return
        b, m = self.bucket(batch_size, cohort), int(speculated)
        self.tokens[b][m] = self.decay * self.tokens[b][m] + tokens
        self.seconds[b][m] = self.decay * self.seconds[b][m] + seconds
        self.samples[b][m] += 1


__all__ = ["SpeculationGate"]
