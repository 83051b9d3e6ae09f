"""The free arms' drafts made before the choice (evidence.FreeDrafts; no vLLM)."""
import numpy as np

from vllm_metasd.core import RequestStateStore, StepController, make_policy
from vllm_metasd.core.draft import Draft
from vllm_metasd.evidence import FreeDrafts

K = 4


class Lookup:
    """A free arm that proposes [7, 8] for even rows and nothing for odd ones."""

    deterministic = True

    def __init__(self):
        self.calls = []

    def draft(self, step):
        self.calls.append(step.rows.tolist())
        even = step.rows % 2 == 0
        ids = np.where(even[:, None], np.array([[7, 8, 0, 0]]), 0).astype(np.int32)
        return Draft(ids, lengths=np.where(even, 2, 0))


class LM:
    deterministic = False


def setup(n=4):
    store = RequestStateStore(make_policy("ucb", 2, beta=1.0))
    ctl = StepController(store, k=K, objective="throughput", free_arms=[False, True])
    req_ids = [f"r{i}" for i in range(n)]
    ctl.begin(req_ids, np.ones(n, dtype=bool))
    return store, ctl, req_ids


def lm_step_with_pending_lookup_drafts(n):
    """n rows at 10 known tokens; the lookup drafted for all of them (even
    rows [7, 8], odd rows nothing) and every row took the LM."""
    store, ctl, req_ids = setup(n)
    free = FreeDrafts()
    seq = np.full(n, 10, dtype=np.int32)
    tokens = np.zeros((n, 16), dtype=np.int32)
    free.make([LM(), Lookup()], ["lm", "lookup"], ctl, np.ones(n, dtype=bool), seq, tokens,
              K, 100)
    free.keep_unchosen(np.zeros(n, dtype=np.int64), req_ids, seq)
    for r in req_ids:
        store.get(r).last_arm = 0
    return store, ctl, req_ids, free, tokens


def test_free_arms_draft_for_every_active_row_once_before_the_choice():
    store, ctl, req_ids = setup()
    lookup, free = Lookup(), FreeDrafts()
    active = np.array([True, True, False, True])
    proposed = free.make([LM(), lookup], ["lm", "lookup"], ctl, active,
                         np.full(4, 10, dtype=np.int32), np.zeros((4, 16), dtype=np.int32),
                         K, vocab_size=100)
    assert lookup.calls == [[0, 1, 3]]  # one call, the active rows
    assert proposed.tolist() == [[0, 2], [0, 0], [0, 0], [0, 0]]
    ids, lengths = free.draft_for(1, np.array([0, 3]))  # the rows that took it
    assert ids[0, :2].tolist() == [7, 8] and lengths.tolist() == [2, 0]
    assert free.draft_for(0, np.array([0])) is None  # a draft LM drafts after the choice


def test_unchosen_free_drafts_are_scored_once_their_tokens_are_known():
    # Row 0's lookup proposed [7, 8] at positions 10-11; row 1's proposed
    # nothing. Both rows drafted with the LM, whose step verified one token:
    # row 0's draft cannot be scored in full yet (a match so far), row 1's
    # empty draft scores 0 for its bandit at once (no sample of its gain).
    store, ctl, req_ids, free, tokens = lm_step_with_pending_lookup_drafts(2)
    tokens[0, 10], tokens[1, 10] = 7, 5
    free.score(ctl, req_ids, tokens, np.full(2, 11, dtype=np.int32))
    even, odd = store.get("r0"), store.get("r1")
    assert even.stats.reward_count[1] == 0  # waits: only 1 of its 2 positions known
    assert odd.stats.reward_count[1] == 1 and odd.stats.reward_sum[1] == 0.0
    assert odd.gain_count[1] == 0  # no proposal: no sample of what it yields when it proposes
    # A plain step later (one more token, in a reordered batch): both tokens
    # match, 2 accepted, scored in full (scored at the first step it could
    # have matched only the one token verified there).
    tokens[[0, 1]] = tokens[[1, 0]]
    tokens[1, 11] = 8
    free.score(ctl, req_ids[::-1], tokens, np.full(2, 12, dtype=np.int32))
    assert even.stats.reward_sum[1] == 1.0 and even.gain_sum[1] == 2 and even.gain_count[1] == 1
    free.score(ctl, req_ids, tokens, np.full(2, 13, dtype=np.int32))  # nothing left pending
    assert even.stats.reward_count[1] == 1


def test_a_mismatch_settles_a_pending_draft_and_a_finished_request_drops_it():
    store, ctl, req_ids, free, tokens = lm_step_with_pending_lookup_drafts(3)
    tokens[0, 10] = 6  # row 0's draft [7, 8] misses its first token: final, 0 accepted
    ctl.finished("r2")  # row 2's request (its draft [7, 8] pending) is gone
    free.score(ctl, req_ids[:2], tokens[:2], np.full(2, 11, dtype=np.int32))
    assert store.get("r0").stats.reward_count[1] == 1 and store.get("r0").gain_sum[1] == 0
    assert store.get("r0").gain_count[1] == 1
    assert free._pending == []  # nothing waits for the finished request


def test_a_failing_free_arm_is_no_option_and_counts_a_failure():
    class Broken(Lookup):
        def draft(self, step):
            raise RuntimeError("boom")

    store, ctl, req_ids = setup(2)
    proposed = FreeDrafts().make([LM(), Broken()], ["lm", "lookup"], ctl, np.ones(2, dtype=bool),
                                 np.full(2, 10, dtype=np.int32),
                                 np.zeros((2, 16), dtype=np.int32), K, 100)
    assert not proposed.any() and ctl.total_failures == [0, 1]
