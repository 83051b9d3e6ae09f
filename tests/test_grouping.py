"""Row grouping and drafter catch-up planning (no vLLM)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_metasd.core import group_rows_by_arm, plan_catch_up


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


def test_plan_catch_up_one_pass_when_everything_fits():
    starts, ends = np.array([3, 0, 7]), np.array([5, 9, 10])
    (rows, s, e, drafts), = plan_catch_up(starts, ends, budget=64)
    assert rows.tolist() == [0, 1, 2] and drafts
    assert s.tolist() == [3, 0, 7] and e.tolist() == [5, 9, 10]


def test_plan_catch_up_fills_long_rows_in_chunks_then_drafts_once():
    starts = np.array([0, 10, 0, 5, 0])
    ends = np.array([30, 12, 100, 9, 8])  # needs 30, 2, 100, 4, 8
    passes = plan_catch_up(starts, ends, budget=40)
    fills = [(r.tolist(), s.tolist(), e.tolist()) for r, s, e, d in passes if not d]
    # Row 2 (100 tokens) first fills KV over [0, 40) and [40, 80), in order.
    assert fills == [([2], [0], [40]), ([2], [40], [80])]
    drafting = [(r, s, e) for r, s, e, d in passes if d]
    assert sorted(int(x) for r, _, _ in drafting for x in r) == [0, 1, 2, 3, 4]
    for r, s, e in drafting:
        assert int((e - s).sum()) <= 40 and (e == ends[r]).all()
    with pytest.raises(ValueError, match="budget"):
        plan_catch_up(starts, ends, budget=3)


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(2, 500)), min_size=1, max_size=40),
       st.integers(4, 600))
def test_plan_catch_up_properties(rows, budget):
    starts = np.array([s for s, _ in rows])
    ends = starts + np.array([n for _, n in rows])
    passes = plan_catch_up(starts, ends, budget)
    drafted = [int(r) for rows_, _, _, d in passes if d for r in rows_]
    assert sorted(drafted) == list(range(len(rows)))  # every row drafts exactly once
    reached = starts.copy()
    for rows_, s, e, drafts in passes:
        assert int((e - s).sum()) <= budget and (e - s >= 2).all()
        assert (s == reached[rows_]).all()  # each pass continues where the last ended
        reached[rows_] = e
    assert (reached == ends).all()
