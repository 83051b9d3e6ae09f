"""MetaSDProposer: N drafters inside vLLM's V1 model runner, one bandit per request.

One engine step, top to bottom (see ``propose``):

1. the target has just verified last step's drafts; ``observe`` (called by the
   model-runner patch right after rejection sampling) fed each request's
   alignment reward to its bandit;
2. each running request's bandit picks an arm;
3. rows are grouped by arm; each draft LM first *catches up*: it runs over the
   tokens of that request it has not seen yet (its KV lives in vLLM's paged
   cache under its own layer prefix, sharing the request's block table), then
   drafts k tokens for its whole group in batched forwards. N-gram arms draft
   from the token history on the CPU;
4. drafts (and, when sampling, the drafter probabilities q) go back to vLLM,
   which schedules them and verifies the mixed batch in one target forward.

A drafter that was not chosen for a request does no work for it; the tokens it
missed are its switching cost, paid the next time it is chosen.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from vllm.model_executor.model_loader import get_model
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.ngram_proposer import NgramProposer

from vllm_metasd.config import MetaSDConfig, load_config
from vllm_metasd.core import (
    CatchUpTracker, RequestStateStore, group_rows_by_arm, plan_catch_up,
)
from vllm_metasd.faults import (
    FAULT_ENV, GARBAGE_KINDS, checked_draft, corrupt_draft, parse_fault_injection,
)
from vllm_metasd.feedback import Verification
from vllm_metasd.patches.speculative_config import drafter_speculative_config

logger = logging.getLogger("vllm.metasd")

# Recent (request id, arm) choices, for learning curves in benchmarks; bounded.
CHOICE_LOG_LEN = 1 << 16
# Consecutive drafting failures (exception or invalid output) that disable an arm.
MAX_ARM_FAILURES = 3


class DraftLMArm(DraftModelProposer):
    """vLLM's draft-model proposer for one drafter, under its own layer prefix.

    The prefix gives the drafter's attention layers their own KV tensors in
    the runner's paged cache; they share each request's block table.
    """

    def __init__(self, vllm_config, device, runner, prefix: str):
        self.prefix = prefix
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)

    def _get_model(self) -> torch.nn.Module:
        from vllm.compilation.backends import set_model_tag

        with set_model_tag(self.prefix):
            return get_model(
                vllm_config=self._create_draft_vllm_config(), prefix=self.prefix
            )


class NgramArm:
    """Prompt-lookup drafting (vLLM's numba n-gram matcher) as a bandit arm."""

    def __init__(self, vllm_config, k: int, min_n: int, max_n: int):
        # NgramProposer reads only these fields; give it exactly those.
        spec = copy.copy(vllm_config.speculative_config)
        object.__setattr__(spec, "prompt_lookup_min", min_n)
        object.__setattr__(spec, "prompt_lookup_max", max_n)
        cfg = copy.copy(vllm_config)
        object.__setattr__(cfg, "speculative_config", spec)
        self.proposer = NgramProposer(cfg)
        self.k = k

    def draft(self, histories: list[np.ndarray], k: int) -> list[list[int]]:
        n = len(histories)
        width = max(len(h) for h in histories)
        tokens = np.zeros((n, width), dtype=np.int32)
        lengths = np.zeros(n, dtype=np.int32)
        for i, h in enumerate(histories):
            tokens[i, : len(h)] = h
            lengths[i] = len(h)
        return self.proposer.batch_propose(n, list(range(n)), lengths, tokens, k)


class MetaSDProposer(DraftModelProposer):
    """The runner's ``drafter`` when speculative_config method is "metasd".

    It is a ``DraftModelProposer`` so that vLLM's model runner keeps treating
    it as a draft-model method (KV for draft layers, probabilistic draft
    probabilities, padded-batch bookkeeping); the work is done by its arms.
    """

    def __init__(self, vllm_config, device, runner):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        spec = vllm_config.speculative_config
        self.config: MetaSDConfig = load_config(spec.metasd)
        budget = vllm_config.scheduler_config.max_num_batched_tokens
        max_len = vllm_config.model_config.max_model_len
        if budget < max_len:
            # A drafter chosen late for a request catches up on the whole
            # sequence; one such row must fit one forward pass (longer ones
            # crash the CPU engine; splitting one row over steps is future work).
            raise ValueError(
                f"MetaSD needs max_num_batched_tokens >= max_model_len (got {budget} < "
                f"{max_len}): raise max_num_batched_tokens or lower max_model_len")
        self.runner = runner
        self.k = spec.num_speculative_tokens
        self.arm_names = [d.name for d in self.config.drafters]
        self.arms: list[DraftLMArm | NgramArm] = []
        for i, d in enumerate(self.config.drafters):
            if d.kind == "ngram":
                self.arms.append(
                    NgramArm(vllm_config, self.k, d.prompt_lookup_min, d.prompt_lookup_max)
                )
                continue
            arm_cfg = copy.copy(vllm_config)  # shares the runner's forward context
            object.__setattr__(
                arm_cfg, "speculative_config", drafter_speculative_config(spec, d.path)
            )
            self.arms.append(
                DraftLMArm(arm_cfg, device, runner, prefix=f"metasd_drafter_{i}_{d.name}")
            )
        self.store = RequestStateStore(
            self.config.make_policy(), self.arm_names, warm_start=self.config.warm_start
        )
        self.tracker = CatchUpTracker()
        self._sampled: torch.Tensor | None = None
        self._discard: torch.Tensor | None = None
        self._last_log = time.monotonic()
        self.overhead_s = 0.0  # selection + reward computation + bookkeeping, for benchmarks
        self.steps = 0
        self.choice_log: collections.deque = collections.deque(maxlen=CHOICE_LOG_LEN)
        self._reset_choice_digest()
        self.vocab_size = self.draft_model_config.get_vocab_size()
        self.failures = [0] * len(self.arms)  # consecutive, per arm
        self.total_failures = [0] * len(self.arms)
        self.disabled: set[int] = set()  # for the engine's lifetime
        self.preempted = 0
        # Tests only (see vllm_metasd.faults); {} in production.
        self._faults = parse_fault_injection(os.environ.get(FAULT_ENV, ""), self.arm_names)
        self._garbage_calls = [0] * len(self.arms)
        if self._faults:
            logger.warning("MetaSD: %s is set, injecting drafter faults %s (tests only)",
                           FAULT_ENV, self._faults)
        logger.info(
            "MetaSD: %d drafters %s, k=%d, policy=%s, reward=%s",
            len(self.arms), self.arm_names, self.k, self.config.policy.name,
            self.config.reward,
        )

    @property
    def lm_arms(self) -> list[DraftLMArm]:
        return [a for a in self.arms if isinstance(a, DraftLMArm)]

    # ---- lifecycle hooks called by vLLM's model runner -------------------------

    def load_model(self, target_model: torch.nn.Module) -> None:
        for arm in self.lm_arms:
            arm.load_model(target_model)
        self.model = self.lm_arms[0].model  # what the runner inspects as "the drafter"

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        for arm in self.lm_arms:
            arm.initialize_attn_backend(kv_cache_config, kernel_block_sizes)
        self.block_size = self.lm_arms[0].block_size

    @property
    def draft_attn_groups(self) -> list:
        return [g for arm in getattr(self, "arms", []) if isinstance(arm, DraftLMArm)
                for g in arm.draft_attn_groups]

    @draft_attn_groups.setter
    def draft_attn_groups(self, value) -> None:
        pass  # the base __init__ assigns []; the arms own their groups

    def dummy_run(self, num_tokens: int, *args, **kwargs) -> None:
        for arm in self.lm_arms:
            arm.dummy_run(num_tokens, *args, **kwargs)

    def prepare_next_token_ids_padded(self, sampled_token_ids, requests, input_batch,
                                      discard_request_mask):
        # Keep this step's verified tokens: the arms catch up from them.
        self._sampled, self._discard = sampled_token_ids, discard_request_mask
        return super().prepare_next_token_ids_padded(
            sampled_token_ids, requests, input_batch, discard_request_mask
        )

    def on_schedule(self, scheduler_output) -> None:
        """Free finished/aborted requests; forget drafter KV of preempted ones."""
        for req_id in scheduler_output.finished_req_ids:
            self.store.free(req_id)
            self.tracker.free(req_id)
        for req_id in scheduler_output.preempted_req_ids or ():
            self.tracker.free(req_id)  # blocks are gone; the bandit keeps learning
            self.preempted += 1
            if (state := self.store.get(req_id)) is not None:
                state.last_arm = None  # its pending draft is never verified
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            self.tracker.free(req_id)
        for new_req in scheduler_output.scheduled_new_reqs:
            self.tracker.free(new_req.req_id)  # a re-used id starts from scratch

    def observe(self, req_ids: list[str], verification: Verification) -> None:
        """Feed each request's verification reward to its bandit (arm of last step)."""
        t0 = time.perf_counter()
        rewards = verification.rewards.tolist()
        drafted = verification.num_drafted.tolist()
        accepted = verification.num_accepted.tolist()
        for req_id, r, n, a in zip(req_ids, rewards, drafted, accepted):
            state = self.store.get(req_id)
            if state is None or state.last_arm is None or n == 0:
                continue
            self.store.record(state, state.last_arm, n, a, r)
        self.overhead_s += time.perf_counter() - t0 + verification.seconds

    # ---- drafting ----------------------------------------------------------------

    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample,
                common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
                num_rejected_tokens_gpu=None, slot_mappings=None):
        k = num_speculative_tokens
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        sampled = self._sampled[:num_reqs].cpu()
        valid = (sampled != -1).sum(dim=1)
        if self._discard is not None:
            valid[self._discard[:num_reqs].cpu()] = 0  # partial prefill: no new token
        n_prev = batch.num_tokens_no_spec[:num_reqs].copy()
        seq_lens = n_prev + valid.numpy()

        t0 = time.perf_counter()
        arms = np.full(num_reqs, -1, dtype=np.int64)
        for row, req_id in enumerate(req_ids):
            if valid[row] > 0:
                state = self.store.get_or_create(req_id)
                arms[row] = self._choose(state)
                if arms[row] >= 0:
                    self.choice_log.append((req_id, int(arms[row])))
                # Order-sensitive digest of every (step, request, arm): tensor-
                # parallel ranks must make identical choices (tests compare it).
                self._choice_hash.update(f"{self.steps}:{req_id}:{arms[row]};".encode())
                self._num_choices += 1
        self.overhead_s += time.perf_counter() - t0

        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        want_probs = self._enable_probabilistic_draft_probs and not sampling_metadata.all_greedy
        probs = None
        if want_probs:
            vocab = self.draft_model_config.get_vocab_size()
            probs = torch.zeros(num_reqs, k, vocab, dtype=torch.float32)

        def history(row: int, start: int) -> np.ndarray:
            prev = batch.token_ids_cpu[row, start:n_prev[row]]
            new = sampled[row, max(0, start - n_prev[row]):valid[row]].numpy()
            return np.concatenate([prev, new.astype(prev.dtype)])

        for arm_idx, rows in enumerate(group_rows_by_arm(arms, len(self.arms))):
            if len(rows) == 0:
                continue
            ngram = isinstance(self.arms[arm_idx], NgramArm)
            try:
                ids, q = self._draft_arm(arm_idx, rows, req_ids, seq_lens, history,
                                         common_attn_metadata, sampling_metadata, k)
                out = checked_draft(ids, q, len(rows), k, self.vocab_size,
                                    need_q=probs is not None and not ngram)
            except Exception as e:  # a drafter must never take the engine down
                self._arm_failed(arm_idx, [req_ids[r] for r in rows], e)
                continue  # its rows keep empty drafts: no speculation, reward 0 below
            self.failures[arm_idx] = 0
            for r, d in zip(rows, out):
                drafts[r] = d
                if probs is not None and ngram and d:  # deterministic draft: q is one-hot
                    probs[r, torch.arange(len(d)), torch.tensor(d)] = 1.0
            if probs is not None and q is not None:
                probs[torch.as_tensor(rows), : q.shape[1]] = q.float()

        t0 = time.perf_counter()
        for row in np.flatnonzero((arms >= 0) & np.array([not d for d in drafts])):
            # The arm proposed nothing (prompt lookup found no match): the step
            # yields one token, the worst outcome, so it earns 0 now. Without
            # this it would never be rewarded and UCB would keep choosing it.
            state = self.store.get(req_ids[row])
            self.store.record(state, int(arms[row]), 0, 0, 0.0)
            state.last_arm = None  # nothing awaits verification
        self.steps += 1
        self._maybe_log()
        self.overhead_s += time.perf_counter() - t0
        self._last_draft_probs = probs
        return drafts

    def _choose(self, state) -> int:
        """The policy's arm for this step. A disabled arm earns 0 and the policy
        chooses again (at most once per arm); -1 (no speculation) if it keeps
        choosing disabled arms."""
        for _ in range(len(self.arms)):
            arm = self.store.choose(state)
            if arm not in self.disabled:
                return arm
            self.store.record(state, arm, 0, 0, 0.0)
        state.last_arm = None
        return -1

    def _draft_arm(self, arm_idx: int, rows: np.ndarray, req_ids, seq_lens, history,
                   common_attn_metadata, sampling_metadata, k: int):
        """One arm's raw output for its rows: (ids, q or None), unvalidated."""
        fault = self._faults.get(arm_idx)  # tests only
        if fault == "raise":
            raise RuntimeError(f"{FAULT_ENV}: injected fault in {self.arm_names[arm_idx]!r}")
        arm = self.arms[arm_idx]
        if isinstance(arm, NgramArm):
            ids, q = arm.draft([history(r, 0) for r in rows], k), None
        else:
            ids, q = self._draft_lm(arm, arm_idx, rows, req_ids, seq_lens, history,
                                    common_attn_metadata, sampling_metadata, k)
        if fault == "garbage":
            kind = GARBAGE_KINDS[self._garbage_calls[arm_idx] % len(GARBAGE_KINDS)]
            self._garbage_calls[arm_idx] += 1
            ids, q = corrupt_draft(ids, q, self.vocab_size, kind)
        return ids, q

    def _arm_failed(self, arm_idx: int, req_ids: list[str], error: Exception) -> None:
        """An arm raised or returned garbage: its rows draft nothing this step
        (reward 0, lossless); its drafter KV for them is recomputed next time;
        after MAX_ARM_FAILURES consecutive failures it is disabled."""
        self.failures[arm_idx] += 1
        self.total_failures[arm_idx] += 1
        for req_id in req_ids:
            self.tracker.invalidate(req_id, arm_idx, from_pos=0)
        name = self.arm_names[arm_idx]
        if self.failures[arm_idx] >= MAX_ARM_FAILURES:
            self.disabled.add(arm_idx)
            logger.warning("MetaSD: drafter %r failed %d times in a row (last: %s: %s); "
                           "disabled for this engine's lifetime", name,
                           self.failures[arm_idx], type(error).__name__, error)
        else:
            logger.warning("MetaSD: drafter %r failed (%s: %s); %d request(s) get no "
                           "speculation this step", name, type(error).__name__, error,
                           len(req_ids))

    def _draft_lm(self, arm: DraftLMArm, arm_idx: int, rows: np.ndarray, req_ids,
                  seq_lens: np.ndarray, history, full_cad: CommonAttentionMetadata,
                  sampling_metadata, k: int):
        """Catch the arm up on each row's unseen tokens, then draft k tokens,
        in forward passes that fit the arm's token buffers."""
        # At least one old token is re-fed so no query is empty (rewriting a KV
        # slot with the same token is idempotent).
        lens = seq_lens[rows]
        starts = np.array([
            min(self.tracker.computed(req_ids[r], arm_idx), int(seq_lens[r]) - 2)
            for r in rows
        ])
        starts = np.maximum(starts, 0)
        passes = plan_catch_up(starts, lens, arm.max_num_tokens)
        if len(passes) == 1:
            return self._lm_pass(arm, arm_idx, rows, starts, lens, req_ids, history,
                                 full_cad, sampling_metadata, k)
        # Long catch-ups (many new requests, long prompts): several passes, each
        # within the arm's buffers (one row always fits: see __init__).
        ids, qs, order = [], [], []
        for sub, ends in passes:
            i, q = self._lm_pass(arm, arm_idx, rows[sub], starts[sub], ends, req_ids,
                                 history, full_cad, sampling_metadata, k)
            ids.append(i)
            qs.append(q)
            order.append(sub)
        back = np.argsort(np.concatenate(order))
        q = None if any(x is None for x in qs) else torch.cat(qs)[back]
        return torch.cat(ids)[back], q

    def _lm_pass(self, arm: DraftLMArm, arm_idx: int, rows: np.ndarray, starts: np.ndarray,
                 lens: np.ndarray, req_ids, history, full_cad: CommonAttentionMetadata,
                 sampling_metadata, k: int):
        """One forward pass of the arm over tokens [start, L) of each row, then
        k draft tokens after position L-1."""
        # Tokens [start, L-1) are "target" inputs; token L-1 is the newest one,
        # appended by vLLM's draft-model first pass.
        seqs = [history(r, int(s))[: int(l) - int(s)] for r, s, l in zip(rows, starts, lens)]
        inputs = np.concatenate([s[:-1] for s in seqs])
        next_ids = torch.tensor([int(s[-1]) for s in seqs], dtype=torch.int32)
        q_lens = lens - 1 - starts
        positions = np.concatenate([np.arange(s, l - 1) for s, l in zip(starts, lens)])

        rows_t = torch.as_tensor(rows, dtype=torch.long)
        block_table = full_cad.block_table_tensor[rows_t]
        pos_t = torch.from_numpy(positions).long()
        row_of_tok = torch.repeat_interleave(torch.arange(len(rows)), torch.from_numpy(q_lens))
        bs = arm.block_size
        slot_mapping = block_table[row_of_tok, pos_t // bs].long() * bs + pos_t % bs
        qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
        qsl[1:] = torch.from_numpy(np.cumsum(q_lens)).int()
        cad_seq_lens = torch.from_numpy(lens - 1).int()
        cad = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_start_loc_cpu=qsl.clone(),
            seq_lens=cad_seq_lens,
            seq_lens_cpu_upper_bound=cad_seq_lens.clone(),
            num_reqs=len(rows),
            num_actual_tokens=int(q_lens.sum()),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(cad_seq_lens.max()),
            block_table_tensor=block_table,
            slot_mapping=slot_mapping,
            causal=True,
        )
        ids = arm.propose(
            num_speculative_tokens=k,
            target_token_ids=torch.from_numpy(inputs).to(torch.int32),
            target_positions=pos_t,
            target_hidden_states=arm.hidden_states[: len(inputs)],
            next_token_ids=next_ids,
            token_indices_to_sample=None,
            common_attn_metadata=cad,
            sampling_metadata=_select_rows(sampling_metadata, rows_t),
        )
        for r, l in zip(rows, lens):
            self.tracker.mark_computed(req_ids[r], arm_idx, int(l))
        return ids, arm.take_last_draft_probs()

    # ---- statistics ------------------------------------------------------------

    def reconfigure(self, policy: dict | None = None, reward: str | None = None) -> None:
        """Swap the bandit policy / reward kind at runtime (benchmarks compare
        policies on one engine). Validated like metasd.json; bandit states
        restart, so call it between workloads."""
        update = {k: v for k, v in (("policy", policy), ("reward", reward)) if v is not None}
        self.config = load_config({**self.config.to_json_dict(), **update})
        self.store = RequestStateStore(
            self.config.make_policy(), self.arm_names, warm_start=self.config.warm_start
        )

    def reset_stats(self) -> None:
        self.store.reset_stats()
        self.overhead_s, self.steps = 0.0, 0
        self.choice_log.clear()
        self._reset_choice_digest()

    def _reset_choice_digest(self) -> None:
        self._choice_hash = hashlib.blake2b(digest_size=8)
        self._num_choices = 0

    def choices(self) -> list[tuple[str, str]]:
        """The recent (request id, drafter name) choices, oldest first."""
        return [(req_id, self.arm_names[arm]) for req_id, arm in self.choice_log]

    def stats(self) -> dict[str, Any]:
        snap = self.store.snapshot()
        snap["arms"] = self.arm_names
        snap["steps"] = self.steps
        snap["overhead_s"] = self.overhead_s
        snap["tracked_requests"] = len(self.tracker)  # requests with drafter KV bookkeeping
        snap["preempted"] = self.preempted
        snap["arm_failures"] = dict(zip(self.arm_names, self.total_failures))
        snap["disabled_arms"] = [self.arm_names[a] for a in sorted(self.disabled)]
        # Equal on every TP rank iff the ranks chose the same arms in the same order.
        snap["arm_choices"] = {"count": self._num_choices,
                               "digest": self._choice_hash.hexdigest()}
        return snap

    def _maybe_log(self) -> None:
        interval = self.config.log_stats_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self._last_log < interval:
            return
        self._last_log = now
        logger.info("MetaSD stats: %s", format_stats_line(self.store.snapshot()))


def format_stats_line(snap: dict[str, Any]) -> str:
    """One line per period: each drafter's share of choices and its acceptance
    rate (cumulative, like the /metrics counters), and the live requests."""
    drafters = snap["drafters"]
    total = sum(d["chosen"] for d in drafters.values()) or 1
    parts = [f"{name} share {d['chosen'] / total:.0%} acceptance {d['acceptance_rate']:.2f} "
             f"({d['accepted']}/{d['drafted']})" for name, d in drafters.items()]
    return f"{'; '.join(parts)}; live requests {snap['live_requests']}"


def _select_rows(sampling_metadata, rows: torch.Tensor):
    """The sampling metadata restricted to one arm's rows (only temperature is
    used when drafting, as in vLLM's own draft-model proposer)."""
    if sampling_metadata.all_greedy or sampling_metadata.temperature is None:
        return sampling_metadata
    return dataclasses.replace(
        sampling_metadata, temperature=sampling_metadata.temperature[rows]
    )
