"""The comparison harness's own pieces (the reference itself runs only in ``python -m bench compare``)."""

from __future__ import annotations

import math

from bench.bounds import batch_bound, online_bound, popularity_oracle
from bench.compare_bench import check_turns, conversations, online, original, ours_batch, proxy_plan, reorder_plan
from bench.workload import generate
from scheduler import plan_batch


def test_multi_turn_batches_keep_turn_order_and_the_check_sees_violations() -> None:
    workload = generate("multiturn", 0, n_queries=300)
    sessions = conversations(workload)
    assert len(set(sessions)) < len(sessions)
    free = plan_batch([query.doc_ids for query in workload.queries])
    assert check_turns(workload, free.order) > 0  # unconstrained, later turns run first
    kept = plan_batch([query.doc_ids for query in workload.queries], conversations=sessions)
    assert check_turns(workload, kept.order) == 0
    assert ours_batch(workload, math.inf).hit_ratio > original(workload, math.inf).hit_ratio


def test_online_proxy_and_reorder_plans_agree_and_beat_the_unchanged_order() -> None:
    workload = generate("overlap", 0, n_queries=200)
    proxy = online(workload, 256_000, proxy_plan)
    api = online(workload, 256_000, reorder_plan)
    assert abs(proxy.hit_ratio - api.hit_ratio) < 0.01
    assert proxy.hit_ratio > 2 * original(workload, 256_000).hit_ratio


def test_the_bounds_are_above_what_the_planners_reach_and_the_oracle_below_the_online_bound() -> None:
    workload = generate("multiturn", 0, n_queries=200)
    online_limit, batch_limit = online_bound(workload), batch_bound(workload)
    proxy = online(workload, math.inf, proxy_plan)
    assert proxy.hit_ratio <= online_limit < batch_limit < 1
    assert ours_batch(workload, math.inf).hit_ratio <= batch_limit
    assert original(workload, math.inf).hit_ratio < popularity_oracle(workload, math.inf) <= online_limit
