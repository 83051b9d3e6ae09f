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
