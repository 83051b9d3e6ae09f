"""MetaSDProposer: the vLLM facade. N drafters inside V1's model runner, one bandit per request.

One engine step, top to bottom:

1. ``on_schedule``: finished, preempted, resumed requests -> the controller's ledgers;
2. ``observe`` (the model-runner patch, right after rejection sampling): each
   request's alignment reward -> its bandit (``core.controller``);
3. ``start_step`` (the model-runner patch, where vLLM would prepare its
   drafter's inputs): this step's new tokens join the runner's token buffer;
   the n-gram arm's drafts for rows that did not take it are scored once
   the tokens at their positions are known;
   under the throughput objective the speculation gate (``core.gate``)
   decides from measured tokens/s whether this step speculates at all (if
   not: no drafts, nothing below runs);
4. ``draft`` (called by the patch instead of vLLM's input preparation for a
   single drafter, which no arm reads): a new request is scored on its
   prompt by the arms it is to be probed by (``evidence``, ``prompt_probe``:
   all, or with warm start those no similar finished prompt tried); under the throughput
   objective the free arms (n-gram) draft for every row first (``evidence``:
   the choice sees which rows they propose for); each request's bandit picks
   an arm (``controller.choose``); rows are grouped by arm, and each chosen
   arm drafts for its group (``arms``: a draft LM first catches up on the
   tokens it missed, then drafts k; n-gram looks up the history); drafts are
   checked (``faults.check_draft``) and go back to vLLM, which verifies the
   mixed batch in one target forward.

An arm no row chose does no work this step.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from numba import njit
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_metasd.arms import DraftLMArm, build_arms
from vllm_metasd.config import MetaSDConfig, load_config
from vllm_metasd.core import RequestStateStore, group_rows_by_arm
from vllm_metasd.core.controller import StepController
from vllm_metasd.core.draft import Draft, DraftStep
from vllm_metasd.core.gate import SpeculationGate
from vllm_metasd.core.rewards import compile_kernels
from vllm_metasd.evidence import FreeDrafts, probe_new_requests
from vllm_metasd.faults import FAULT_ENV, FaultyArm, check_draft, parse_fault_injection
from vllm_metasd.feedback import Verification
from vllm_metasd.telemetry import Telemetry, format_stats_line  # noqa: F401 (re-export)

logger = logging.getLogger("vllm.metasd")

# Greedy batches: the BD reward reads each drafter's q at its TOP_Q most likely
# tokens (vLLM itself needs no q there); a lower bound of 1 - TV, exact when q's
# mass lies in them.
TOP_Q = 64
# Longer between two proposals: the engine was idle, not stepping; no timing sample.
IDLE_GAP_S = 2.0


@njit(cache=True)
def take_verified(sampled, discard, vocab_size, num_tokens, token_ids, num_prompt_tokens):
    """This step's verified tokens ``sampled`` [n, k+1]: their count per row,
    as vLLM's ``prepare_next_token_ids_padded`` counts them (ids in [0, vocab);
    none for a row whose sample is discarded, a partial prefill), written into
    the runner's token buffer right after each row's ``num_tokens`` known ones
    (vLLM's bookkeeping writes the same values there later), so every arm
    reads the whole history in place. Returns (count, tokens known) per row,
    the step's tokens and rows that got none (the gate's sample), and the
    fewest and most output tokens of a row (the fewest: of rows that got
    tokens; for the gate's cohort measure)."""
    n = sampled.shape[0]
    valid = np.zeros(n, dtype=np.int64)
    seq_lens = np.empty(n, dtype=np.int32)
    total = empty = 0
    least, most = 1 << 62, 0
    for i in range(n):
        if not discard[i]:
            for j in range(sampled.shape[1]):
                valid[i] += 0 <= sampled[i, j] < vocab_size
        m = min(valid[i], token_ids.shape[1] - num_tokens[i])
        for j in range(m):
            token_ids[i, num_tokens[i] + j] = sampled[i, j]
        seq_lens[i] = num_tokens[i] + valid[i]
        total += valid[i]
        empty += valid[i] == 0
        out = seq_lens[i] - num_prompt_tokens[i]
        most = max(most, out)
        if valid[i] > 0:
            least = min(least, out)
    return valid, seq_lens, total, empty, least, most


class MetaSDProposer(DraftModelProposer):
    """The runner's ``drafter`` when speculative_config method is "metasd".

    A ``DraftModelProposer`` so that vLLM's model runner keeps treating it as a
    draft-model method (KV for draft layers, draft probabilities, padded-batch
    bookkeeping); the drafting is done by its arms.
    """

    def __init__(self, vllm_config, device, runner):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.config: MetaSDConfig = load_config(vllm_config.speculative_config.metasd)
        self.runner = runner
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.arm_names = [d.name for d in self.config.drafters]
        self.vocab_size = self.draft_model_config.get_vocab_size()
        self.arms = build_arms(vllm_config, device, runner, self.config.drafters,
                               top_q=self.top_q)
        # Tests only (vllm_metasd.faults): {} in production.
        for i, mode in parse_fault_injection(os.environ.get(FAULT_ENV, ""),
                                             self.arm_names).items():
            logger.warning("MetaSD: %s is set: drafter %r injects %s faults (tests only)",
                           FAULT_ENV, self.arm_names[i], mode)
            self.arms[i] = FaultyArm(self.arms[i], self.arm_names[i], mode, self.vocab_size)
        parallel = vllm_config.parallel_config
        self.ranks = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self.controller = self._new_controller()
        self.gate = self._new_gate()
        self.telemetry = Telemetry(self.arm_names, self.config.log_stats_interval_s)
        # This step (start_step): its start, rows, tokens known per row (this
        # step's verified ones included) and their count per row (0: a partial
        # prefill); and the gate's decision
        self._step: tuple[float, int, np.ndarray, np.ndarray] | None = None
        self._speculating = True
        self._q: torch.Tensor | None = None  # draft probabilities, allocated once, grown
        self._step_end: float | None = None  # when the last step (either kind) ended
        # The last step for the gate: (rows, speculated, its start, steady: not
        # the first speculative step after plain ones, nor a prompt probe); and
        # whether a request joined the batch since (its prefill is in the step's time)
        self._last_step: tuple[int, bool, float, bool] | None = None
        self._joined = False
        # Whether the batch is a cohort (its requests all started within two
        # steps, none joined since: core.gate; an offline generate's requests
        # reach the engine one by one; it changes only on a step a request
        # joined, which the gate does not learn from) and the last step's
        # fewest output tokens of a row
        self._cohort = False
        self._least = 0
        # Whether this step continues a request of the last one: if not, the
        # engine may have sat idle before it (no request), and the time since
        # the last step is not the target's
        self._continuing = False
        self.plain_steps = 0  # steps the gate ran without speculation
        self._free = FreeDrafts()  # n-gram drafts, made before the choice (throughput)
        one = np.zeros((1, 1), dtype=np.int32)  # compile now, with the engine's types
        take_verified(one, np.zeros(1, dtype=bool), 1, one[0], one, one[0])
        compile_kernels()  # the verification's (core.rewards)
        self._top = None  # (req ids, q at top tokens) of the last greedy step, for its BD
        logger.info("MetaSD: %d drafters %s, k=%d, policy=%s, reward=%s", len(self.arms),
                    self.arm_names, self.k, self.config.policy.name, self.config.reward)

    def _new_controller(self) -> StepController:
        store = RequestStateStore(self.config.make_policy(), self.arm_names,
                                  warm_start=self.config.warm_start,
                                  prompt_probe=self.config.prompt_probe)
        objective = self.config.objective
        if objective == "throughput" and self.ranks > 1:
            # Its choices depend on each rank's own timings; the ranks of one
            # drafter forward must choose alike, so they choose by alignment.
            logger.warning("MetaSD: objective 'throughput' chooses from this process's "
                           "timings; with %d ranks per model the ranks could disagree, "
                           "so 'alignment' is used", self.ranks)
            objective = "alignment"
        return StepController(store, k=self.k, objective=objective,
                              free_arms=[a.deterministic for a in self.arms],
                              beta=float(self.config.policy.params.get("beta", 0.1)))

    def _new_gate(self) -> SpeculationGate | None:
        """Under the throughput objective (not for a pinned arm): whether a step
        speculates at all, from measured tokens/s per batch size (core.gate)."""
        if (not self.config.speculation_gate or self.controller.objective != "throughput"
                or self.config.policy.name == "fixed"):
            return None
        return SpeculationGate()

    @property
    def reward_kind(self) -> str:
        """The reward computed at verification: none under policy "fixed" (it
        learns nothing, so the step skips the work: q at temperature 0, the BD)."""
        return "none" if self.config.policy.name == "fixed" else self.config.reward

    @property
    def top_q(self) -> int:
        """Top tokens of each drafter's q kept for greedy batches: the BD
        reward's (no other reward reads q where vLLM does not need it)."""
        return TOP_Q if self.reward_kind == "bd" else 0

    @property
    def lm_arms(self) -> list[DraftLMArm]:
        return [a for a in getattr(self, "arms", []) if not a.deterministic]

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
        return [g for arm in self.lm_arms for g in arm.draft_attn_groups]

    @draft_attn_groups.setter
    def draft_attn_groups(self, value) -> None:
        pass  # the base __init__ assigns []; the arms own their groups

    def dummy_run(self, num_tokens: int, *args, **kwargs) -> None:
        for arm in self.lm_arms:
            arm.dummy_run(num_tokens, *args, **kwargs)

    def on_schedule(self, scheduler_output) -> None:
        t0 = time.perf_counter()
        c = self.controller
        for req_id in scheduler_output.finished_req_ids:
            c.finished(req_id)
        for req_id in scheduler_output.preempted_req_ids or ():
            c.preempted_request(req_id)
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            c.restarted(req_id)
        for new_req in scheduler_output.scheduled_new_reqs:
            c.restarted(new_req.req_id)
        cached = scheduler_output.scheduled_cached_reqs
        self._joined = bool(scheduler_output.scheduled_new_reqs or cached.resumed_req_ids)
        self._continuing = cached.num_reqs > len(cached.resumed_req_ids)
        self.telemetry.add("hooks", t0)

    def observe(self, req_ids: list[str], verification: Verification) -> None:
        t0 = time.perf_counter()
        self.controller.observe(req_ids, verification.num_drafted.tolist(),
                                verification.num_accepted.tolist(),
                                verification.rewards.tolist())
        self.telemetry.phase_s["reward"] += verification.seconds
        self.telemetry.add("reward", t0)

    # ---- drafting ----------------------------------------------------------------

    def start_step(self, num_target_tokens: int, sampled_token_ids: torch.Tensor,
                   discard: np.ndarray) -> bool:
        """Whether this step speculates: called by the model-runner patch with
        the tokens the target's forward processed, what it sampled ([n, k+1],
        -1 past the accepted ones) and vLLM's mask of rows whose sample is
        discarded (a partial prefill)."""
        t = start = time.perf_counter()
        if (self._step_end is not None and self._continuing
                and t - self._step_end < IDLE_GAP_S):
            # The target's forward that just ran, and the tokens it processed.
            self.controller.observe_step_time(num_target_tokens, t - self._step_end)
        batch = self.runner.input_batch
        n = batch.num_reqs
        sampled = sampled_token_ids[:n].cpu().numpy()
        valid, seq_lens, tokens, empty, least, most = take_verified(
            sampled, discard, self.vocab_size, batch.num_tokens_no_spec, batch.token_ids_cpu,
            batch.num_prompt_tokens)
        self._step = (start, n, seq_lens, valid)
        if self._joined:  # a cohort if no request is past its first two steps
            self._cohort = most <= 2 * (self.k + 1)
        self._free.score(self.controller, batch.req_ids[:n], batch.token_ids_cpu, seq_lens)
        self._speculating = self._speculate(n, start, tokens, empty == 0, least)
        self.telemetry.add("inputs", t)
        return self._speculating

    def plain_step(self) -> list[list[int]]:
        """No speculation this step: no choice, no drafting, nothing to score
        (drafters catch up on the missed tokens when next chosen)."""
        start, n = self._step[:2]
        self.plain_steps += 1
        self._last_draft_probs = None
        self._top = None
        return self._end_step([[] for _ in range(n)], speculated=False, start=start)

    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample,
                common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
                num_rejected_tokens_gpu=None, slot_mappings=None):
        """vLLM's drafter interface, reached under async scheduling only (vLLM
        prepared its inputs for a single drafter; the arms read none of them)."""
        if not self._speculating:
            return self.plain_step()
        return self.draft(num_speculative_tokens, common_attn_metadata.block_table_tensor,
                          sampling_metadata)

    def draft(self, k: int, block_table: torch.Tensor, sampling_metadata) -> list[list[int]]:
        """This step's drafts, one list per batch row, after ``start_step``
        decided to speculate: what the arms read is the runner's token buffer,
        the step's block table and sampling metadata."""
        tel = self.telemetry
        t = time.perf_counter()
        start, n, seq_lens, valid = self._step
        batch = self.runner.input_batch
        req_ids = batch.req_ids[:n]
        active = valid > 0  # rows with a new token

        new_rows = self.controller.begin(
            req_ids, active, lambda r: batch.token_ids_cpu[r, :batch.num_prompt_tokens[r]])
        probing = bool(len(new_rows)) and self.config.prompt_probe and self.reward_kind != "none"
        if probing:
            probing = probe_new_requests(self.arms, self.arm_names, self.controller, DraftStep(
                rows=new_rows, starts=np.zeros(len(new_rows), dtype=np.int64),
                seq_lens=seq_lens, token_ids=batch.token_ids_cpu,
                block_table=block_table,
                sampling_metadata=sampling_metadata, k=0, want_q=False))
        if probing:  # some arm passed over a prompt
            t = tel.add("probe", t)
        proposed = None
        if self.controller.objective == "throughput":  # free arms draft before the choice
            proposed = self._free.make(self.arms, self.arm_names, self.controller, active,
                                       seq_lens, batch.token_ids_cpu, k, self.vocab_size)
            t = tel.add("forward", t)
        arms = self.controller.choose(req_ids, active, seq_lens, proposed)
        tel.record_choices(req_ids, arms)
        t = tel.add("choice", t)

        # Rejection sampling needs the full q of sampled rows; in greedy
        # batches the BD reward reads q at each drafter's top tokens only.
        want_q = self._enable_probabilistic_draft_probs and not sampling_metadata.all_greedy
        want_top = self.top_q > 0 and not want_q
        q = None
        top = (torch.zeros(n, k, TOP_Q, device=self.device),
               torch.zeros(n, k, TOP_Q, dtype=torch.long, device=self.device)) if want_top else None
        groups = group_rows_by_arm(arms, len(self.arms))
        chosen = [a for a, rows in enumerate(groups) if len(rows)]  # chosen arms only
        whole = len(chosen) == 1 and len(groups[chosen[0]]) == n  # one group drafts every row
        ids = lengths = None  # whole: that group's own, unless it failed
        if not whole:
            ids = np.zeros((n, k), dtype=np.int64)
            lengths = np.zeros(n, dtype=np.int64)
        for a in chosen:
            rows, arm = groups[a], self.arms[a]
            made = self._free.draft_for(a, rows)  # a free arm's, made before the choice
            if made is not None:
                row_ids, row_lens = made
                draft = Draft(row_ids, lengths=row_lens)
            else:
                step = DraftStep(rows=rows, starts=self.controller.caught_up(a, rows),
                                 seq_lens=seq_lens, token_ids=batch.token_ids_cpu,
                                 block_table=block_table,
                                 sampling_metadata=sampling_metadata, k=k, want_q=want_q)
                forward0 = getattr(arm, "forward_s", 0.0)
                try:
                    draft = arm.draft(step)
                    steady = arm.deterministic or bool(
                        (seq_lens[rows] - step.starts <= k + 1).all())
                    t = self._charge_draft(t, a, len(rows), forward0, steady)
                    row_ids, row_lens = check_draft(draft, len(rows), k, self.vocab_size,
                                                    need_q=want_q and not arm.deterministic)
                except Exception as e:  # a drafter must never take the engine down
                    self.controller.failed(a, rows, self.arm_names[a], e)
                    t = tel.add("validation", t)
                    continue  # its rows draft nothing: no speculation, reward 0
                t = tel.add("validation", t)
            self.controller.drafted(a, rows, row_lens)
            if draft.computed is not None:
                self.controller.mark_caught_up(a, rows, draft.computed)
            if whole:
                ids, lengths = row_ids, row_lens
            else:
                ids[rows, :row_ids.shape[1]] = row_ids
                lengths[rows] = row_lens
            if want_q:
                if whole and draft.q is not None:
                    q = draft.q  # vLLM reads the arm's q as is
                else:
                    q = self._q_buffer(n, k) if q is None else q
                    self._fill_q(q, rows, row_ids, row_lens, draft.q)
            if top is not None:
                self._fill_top(top, rows, row_ids, draft.q_top)
            t = tel.add("assemble", t)

        if proposed is not None:
            self._free.keep_unchosen(arms, req_ids, seq_lens)
        self._last_draft_probs = q
        self._top = None if top is None else (list(req_ids), top)
        drafts = ([[] for _ in range(n)] if ids is None
                  else [row[:m] for row, m in zip(ids.tolist(), lengths.tolist())])
        tel.add("assemble", t)
        return self._end_step(drafts, speculated=True, start=start, probed=probing)

    def _speculate(self, n: int, start: float, tokens: int, every_row: bool,
                   least: int) -> bool:
        """The gate's decision for this step, after it learnt from the last one:
        the wall time since the last step's start and the tokens it yielded,
        when no request joined (no prefill in that time; requests that
        finished only drop out), every row got its tokens and the step was
        ``steady`` (not the first speculative step after plain ones, whose
        drafters catch up on the tokens they missed: a cost of the gate's
        switching, not of speculating; no prompt probe). A cohort's step
        yielded its rows times how far its least-advanced request advanced
        (``least``: this step's fewest output tokens of a row)."""
        if self.gate is None:
            return True
        if self._last_step is not None and not self._joined:
            rows, speculated, t0, steady = self._last_step
            if self._cohort:
                tokens = rows * (least - self._least)
            if steady and start - t0 < IDLE_GAP_S and every_row and tokens >= 0:
                self.gate.observe(rows, speculated, tokens, start - t0, self._cohort)
        self._least = least
        return self.gate.speculate(n, self._cohort)

    def _end_step(self, drafts: list[list[int]], speculated: bool, start: float,
                  probed: bool = False) -> list[list[int]]:
        """Either kind of step: the periodic log, and what the gate and the
        target's cost fit time the next step from. For the gate, a speculative
        step right after plain ones pays its drafters' catch-up on the plain
        steps' tokens (the gate's own switch), and a probe passes over whole
        prompts: neither is what speculating yields (catch-ups of rows that
        changed drafters are, and are measured)."""
        self.telemetry.maybe_log(self._snapshot)
        after_plain = speculated and self._last_step is not None and not self._last_step[1]
        self._last_step = (len(drafts), speculated, start, not (probed or after_plain))
        self._step_end = time.perf_counter()
        return drafts

    def _charge_draft(self, t: float, a: int, rows: int, forward0: float,
                      steady: bool) -> float:
        """Split arm a's drafting time: its forwards (n-gram: the whole lookup)
        and, for draft LMs, the catch-up planning and metadata around them.
        When no row caught up on more than one step's tokens (``steady``), the
        whole is one sample of the arm's group cost (a long catch-up, e.g. a
        whole prompt, is priced per row by the controller, not here)."""
        arm = self.arms[a]
        now = time.perf_counter()
        if steady:
            self.controller.observe_group_time(a, rows, now - t)
        if arm.deterministic:
            self.telemetry.phase_s["forward"] += now - t
            return now
        fwd = arm.forward_s - forward0
        self.telemetry.phase_s["forward"] += fwd
        self.telemetry.phase_s["catch_up"] += now - t - fwd
        return now

    def _fill_top(self, top, rows: np.ndarray, ids: np.ndarray, q_top) -> None:
        rows_t = torch.as_tensor(rows, device=self.device)
        if q_top is not None:
            m = q_top[0].shape[-1]
            top[0][rows_t, :, :m] = q_top[0].float()
            top[1][rows_t, :, :m] = q_top[1].long()
            return
        # A deterministic draft (n-gram): q is one-hot at each drafted token.
        w = ids.shape[1]
        top[0][rows_t, :w, 0] = 1.0
        top[1][rows_t, :w, 0] = torch.as_tensor(ids, device=self.device).long()

    def q_top_for(self, req_ids: list[str], num_draft_tokens: list[int]):
        """For the verification of last step's drafts, in vLLM's flattened
        order: each drafted token's q at its drafter's top tokens (None when
        vLLM has the full q, or the reward needs none)."""
        if self._top is None:
            return None
        prev_ids, (vals, ids) = self._top
        self._top = None
        row_of = {r: i for i, r in enumerate(prev_ids)}
        rows = [row_of.get(r, -1) for r, nd in zip(req_ids, num_draft_tokens) if nd > 0]
        counts = [nd for nd in num_draft_tokens if nd > 0]
        if not rows:
            return None
        rows_t = torch.as_tensor(rows, device=vals.device)
        keep = torch.arange(vals.shape[1], device=vals.device)[None, :] < torch.as_tensor(
            counts, device=vals.device)[:, None]
        known = (rows_t >= 0)[:, None, None]  # placeholder rows: q unknown, scored 0 anyway
        v = torch.where(known, vals[rows_t.clamp(min=0)], 0.0)[keep]
        i = torch.where(known, ids[rows_t.clamp(min=0)], 0)[keep]
        return v, i

    def _q_buffer(self, n: int, k: int) -> torch.Tensor:
        """Draft probabilities [n, k, V] on the runner's device, allocated once
        (grown to the largest batch seen); only drafted rows are written."""
        if self._q is None or self._q.shape[0] < n or self._q.shape[1] != k:
            rows = max(n, 2 * (0 if self._q is None else self._q.shape[0]))
            self._q = torch.empty(rows, k, self.vocab_size, dtype=torch.float32,
                                  device=self.device)
        return self._q[:n]

    def _fill_q(self, q: torch.Tensor, rows: np.ndarray, ids: np.ndarray,
                lengths: np.ndarray, draft_q: torch.Tensor | None) -> None:
        rows_t = torch.as_tensor(rows, device=q.device)
        if draft_q is not None:
            q[rows_t, :draft_q.shape[1]] = draft_q.float()
            return
        # A deterministic draft (n-gram): q is one-hot at each drafted token.
        q[rows_t] = 0.0
        r, j = np.nonzero(np.arange(ids.shape[1]) < lengths[:, None])
        q[torch.as_tensor(rows[r], device=q.device), torch.as_tensor(j, device=q.device),
          torch.as_tensor(ids[r, j], device=q.device)] = 1.0

    # ---- statistics and control ------------------------------------------------

    def reconfigure(self, **settings) -> None:
        """Swap metasd.json settings other than the drafters and k at runtime
        (benchmarks compare them on one engine). Validated like metasd.json;
        bandit states and cost fits restart, so call it between workloads."""
        fixed = {"drafters", "num_speculative_tokens"} & settings.keys()
        if fixed:
            raise ValueError(f"{sorted(fixed)} cannot change at runtime; start a new engine")
        self.config = load_config({**self.config.to_json_dict(), **settings})
        for arm in self.lm_arms:
            arm.top_q = self.top_q
        self.controller = self._new_controller()
        self.gate = self._new_gate()

    def reset_stats(self) -> None:
        self.controller.store.reset_stats()
        self.controller.placeholder_drafts = 0
        self.plain_steps = 0
        self.telemetry.reset()

    def choices(self) -> list[tuple[str, str]]:
        return self.telemetry.choices()

    def _snapshot(self) -> dict[str, Any]:
        c = self.controller
        return {**c.store.snapshot(),
                "tracked_requests": sum(1 for s in c.store.states() if s.computed),
                "preempted": c.preempted,
                "placeholder_drafts": c.placeholder_drafts,
                "plain_steps": self.plain_steps,
                "gate": None if self.gate is None else self.gate.snapshot(),
                "cost_model": c.cost_snapshot(),
                "arm_failures": dict(zip(self.arm_names, c.total_failures)),
                "disabled_arms": [self.arm_names[a] for a in np.flatnonzero(c.disabled)]}

    def stats(self) -> dict[str, Any]:
        return self.telemetry.snapshot(self._snapshot())
