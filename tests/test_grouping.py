"""Row grouping and drafter catch-up bookkeeping (no vLLM)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_metasd.core import CatchUpTracker, group_rows_by_arm


def test_group_rows_by_arm_is_stable_and_skips_negative():
    groups = group_rows_by_arm(np.array([2, 0, -1, 2, 0]), 3)
    assert [g.tolist() for g in groups] == [[1, 4], [], [0, 3]]
    assert [g.tolist() for g in group_rows_by_arm([], 2)] == [[], []]


def test_group_rows_rejects_unknown_arm():
    with pytest.raises(ValueError, match="arm 3"):
        group_rows_by_arm([0, 3], 3)


@given(st.integers(1, 8).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.integers(-1, k - 1), max_size=64))))
def test_group_rows_matches_a_naive_partition(case):
    k, arms = case
    groups = group_rows_by_arm(arms, k)
    assert [g.tolist() for g in groups] == [
        [row for row, a in enumerate(arms) if a == arm] for arm in range(k)]


def test_catch_up_tracker_pending_and_mark():
    t = CatchUpTracker()
    assert t.pending("r", 0, 10) == 10
    t.mark_computed("r", 0, 10)
    assert t.pending("r", 0, 13) == 3 and t.pending("r", 1, 13) == 13
    t.mark_computed("r", 1, 13)
    assert t.pending("r", 1, 13) == 0 and "r" in t and len(t) == 1


def test_invalidate_one_arm_or_all():
    t = CatchUpTracker()
    t.mark_computed("r", 0, 10)
    t.mark_computed("r", 1, 6)
    t.invalidate("r", 0, from_pos=8)  # rejected drafts: arm 0 keeps 8 tokens
    assert (t.computed("r", 0), t.computed("r", 1)) == (8, 6)
    t.invalidate("r", from_pos=7)  # all arms; never grows a prefix (arm 1 stays 6)
    assert (t.computed("r", 0), t.computed("r", 1)) == (7, 6)
    t.invalidate("r", 2, from_pos=0)  # an arm never used: nothing to do
    t.invalidate("unknown", from_pos=0)
    assert t.computed("r", 2) == 0 and "unknown" not in t


def test_free_forgets_the_request():
    t = CatchUpTracker()
    t.mark_computed("r", 0, 10)
    t.free("r")
    t.free("r")  # idempotent (finish after abort)
    assert len(t) == 0 and t.computed("r", 0) == 0


def test_plan_catch_up_respects_the_budget_and_covers_every_row():
    from vllm_metasd.core import plan_catch_up

    starts = np.array([0, 10, 0, 5, 0])
    ends = np.array([30, 12, 100, 9, 8])  # needs 30, 2, 100, 4, 8
    passes = plan_catch_up(starts, ends, budget=40)
    covered = sorted(int(r) for rows, _ in passes for r in rows)
    assert covered == [0, 1, 2, 3, 4]
    for rows, pass_ends in passes:
        assert int((pass_ends - starts[rows]).sum()) <= 40
    # The oversized row advances by exactly the budget; the others finish.
    got = {int(r): int(e) for rows, pass_ends in passes for r, e in zip(rows, pass_ends)}
    assert got == {0: 30, 1: 12, 2: 40, 3: 9, 4: 8}
    with pytest.raises(ValueError, match="budget"):
        plan_catch_up(starts, ends, budget=1)


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 500)), min_size=1, max_size=40),
       st.integers(2, 600))
def test_plan_catch_up_properties(rows, budget):
    from vllm_metasd.core import plan_catch_up

    starts = np.array([s for s, _ in rows])
    ends = starts + np.array([n for _, n in rows])
    passes = plan_catch_up(starts, ends, budget)
    seen = [int(r) for rows_, _ in passes for r in rows_]
    assert sorted(seen) == list(range(len(rows)))  # every row exactly once
    for rows_, pass_ends in passes:
        assert int((pass_ends - starts[rows_]).sum()) <= budget
        assert (pass_ends > starts[rows_]).all() and (pass_ends <= ends[rows_]).all()
