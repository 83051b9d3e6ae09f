"""The warm start: a new request's prior from finished requests whose prompts
are like its own (no vLLM).

Each finished request leaves its prompt's signature (a bag of its tokens) and
per arm its mean reward and mean tokens per step beyond the target's (NaN: the
arm was not tried). A new request starts, per arm, from the mean over the
``NEIGHBOURS`` requests most like it (cosine similarity of signatures) among
the last ``MEMORY`` that tried that arm, worth the store's pseudo-observations;
an arm none of them tried has no prior and is explored. Without a prompt every
remembered request counts alike (the population's mean).

Why neighbours, not the population: a drafter's worth depends on the
request's domain, and the population's mean ranks a specialist by all
domains. Why per arm: the nearest requests overall often did not try an arm
(it looked poor for them), and a prior from them alone would have every new
request explore it again. Replay (``benchmarks/replay.py``, the zoo's trace in
four prompt orders, the shipped setup): paper pool 1.274x -> 1.292x the best
single drafter (accepted length 0.94x -> 0.96x the per-request oracle's),
default pool 1.180x -> 1.176x; from the nearest 8 overall instead: 1.296x and
1.165x (the specialists re-explored by request after request). A prompt's tokens tell its domain
well: on the zoo's 320 mixed prompts (25 tokens each on average) the nearest
one's domain is the prompt's own for 94% of them, online; on SmolLM2's 160
chat prompts (108 tokens, the chat template shared) for 99%.

With the prompt probe (``prior(..., probe=True)``) an arm that no finished
request with a similar prompt (cosine at least ``SIMILAR``) tried gets no
prior: the new request probes it on its own prompt instead (``unknown``).
Why: per arm the nearest triers can be of another domain (the first requests
try every arm), and their poor figure for a specialist held the specialist's
own domain off it for good (paper pool, the zoo's trace at 64 tokens: the data
and german specialists 0 steps on their own domains). Replay (four prompt
orders, 128-token requests, warm start without -> with the probe): paper pool
1.283x -> 1.304x the best single drafter, accepted length 0.95x -> 0.98x the
oracle's; default pool 1.184x -> 1.175x; SmolLM2's chat prompts (cosine
0.36-0.54 across domains, the template shared) probe nothing after the first
request: as without (0.912x the n-gram arm both).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vllm_metasd.core.policies import ArmPrior

NEIGHBOURS = 8
MEMORY = 512
SIGNATURE_DIM = 1024
# A finished request's prompt is like a new one's from this cosine on: on the
# zoo's prompts the nearest of the same domain has median 0.40, of another 0.16
# (90th percentile 0.22).
SIMILAR = 0.2


@dataclasses.dataclass
class Prior:
    """A new request's prior, per arm."""

    bandit: ArmPrior
    gains: np.ndarray  # mean tokens per step beyond the target's
    gain_counts: np.ndarray  # their worth in observations
    unknown: np.ndarray  # bool: no finished request with a similar prompt tried it


def prompt_signature(tokens: np.ndarray) -> np.ndarray:
    """A prompt's bag of tokens: square-rooted counts of its token ids hashed
    into ``SIGNATURE_DIM`` buckets, unit length (cosine similarity is a dot
    product)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64) % SIGNATURE_DIM,
                         minlength=SIGNATURE_DIM)
    v = np.sqrt(counts, dtype=np.float32)
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


class WarmStart:
    """The last ``memory`` finished requests, and priors from the most similar."""

    def __init__(self, num_arms: int, memory: int = MEMORY, neighbours: int = NEIGHBOURS):
        self.neighbours = neighbours
        self._signatures = np.zeros((memory, SIGNATURE_DIM), dtype=np.float32)
        self._rewards = np.full((memory, num_arms), np.nan)
        self._gains = np.full((memory, num_arms), np.nan)
        self._size = 0  # requests remembered
        self._next = 0  # the slot the next one takes (the oldest once full)

    def __len__(self) -> int:
        return self._size

    def observe(self, signature: np.ndarray | None, rewards, gains) -> None:
        """A finished request: its prompt's signature (None: unknown), per arm
        its mean reward and mean gain (NaN: arm not tried)."""
        i = self._next
        self._signatures[i] = 0.0 if signature is None else signature
        self._rewards[i] = rewards
        self._gains[i] = gains
        self._next = (i + 1) % len(self._signatures)
        self._size = min(self._size + 1, len(self._signatures))

    def prior(self, signature: np.ndarray | None, pseudo_count: float,
              probe: bool = False) -> Prior | None:
        """For a new request with this prompt signature (None: unknown, every
        remembered request alike); with ``probe`` the arms it is ``unknown``
        about get no prior (the request probes them). None before any request
        finished."""
        n = self._size
        if n == 0:
            return None
        sims = None if signature is None else self._signatures[:n] @ signature
        rewards, reward_counts = self._nearest_mean(self._rewards[:n], sims, pseudo_count)
        gains, gain_counts = self._nearest_mean(self._gains[:n], sims, pseudo_count)
        tried = ~np.isnan(self._rewards[:n])
        if sims is not None:
            tried &= (sims >= SIMILAR)[:, None]
        unknown = ~tried.any(axis=0)
        if probe:
            reward_counts[unknown] = gain_counts[unknown] = 0.0
        return Prior(ArmPrior(rewards.tolist(), reward_counts.tolist()), gains, gain_counts,
                     unknown)

    def _nearest_mean(self, values: np.ndarray, sims: np.ndarray | None,
                      pseudo_count: float) -> tuple[np.ndarray, np.ndarray]:
        """Per arm (column of ``values``, NaN: not tried): the mean over the
        ``neighbours`` rows with the highest ``sims`` among those that tried it
        (None: all of them), worth ``pseudo_count`` (0 and 0 where none did)."""
        tried = ~np.isnan(values)
        if sims is not None and len(values) > self.neighbours:
            score = np.where(tried, sims[:, None], -np.inf)
            near = np.argpartition(-score, self.neighbours - 1, axis=0)[:self.neighbours]
            keep = np.zeros_like(tried)
            np.put_along_axis(keep, near, True, axis=0)
            tried &= keep
        n = tried.sum(axis=0)
        total = np.where(tried, values, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(n > 0, total / n, 0.0)
        return means, np.where(n > 0, float(pseudo_count), 0.0)
