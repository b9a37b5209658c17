"""The replica choice: cache against load, the balance guard, affinity, and even spreading of misses."""

from __future__ import annotations

from gateway.upstream.ranking import BalanceGuard, Candidate, rank

GUARD = BalanceGuard(abs_threshold=4, rel_threshold=1.5)


def _order(candidates: list[Candidate], prompt: int = 1000, affinity: int | None = None) -> list[int]:
    return [c.replica for c in rank(candidates, prompt, GUARD, affinity)]


def test_the_replica_holding_the_prefix_wins_under_even_load() -> None:
    candidates = [Candidate(0, 0, 2, 0), Candidate(1, 800, 2, 0), Candidate(2, 300, 2, 0)]
    assert _order(candidates) == [1, 2, 0]


def test_queued_prefill_outweighs_a_small_cache_advantage() -> None:
    # replica 1 saves 300 tokens but has 2,000 uncached tokens queued ahead of this request
    candidates = [Candidate(0, 0, 2, 0), Candidate(1, 300, 3, 2000)]
    assert _order(candidates)[0] == 0


def test_a_held_prefix_outweighs_a_queue_the_engine_batches_it_with() -> None:
    """Queued prefill counts for a quarter (the engine batches it with this request's): holding 800 of 1,000
    tokens beats an idle replica behind 1,200 queued tokens (200 + 300 against 1,000; counted whole, 1,400)."""
    candidates = [Candidate(0, 0, 2, 0), Candidate(1, 800, 3, 1200)]
    assert _order(candidates)[0] == 1


def test_the_balance_guard_sends_to_the_least_loaded_whatever_the_cache() -> None:
    candidates = [Candidate(0, 1000, 9, 0), Candidate(1, 0, 1, 0), Candidate(2, 0, 4, 0)]
    assert GUARD.imbalanced([9, 1, 4])
    assert _order(candidates) == [1, 2, 0]


def test_the_guard_needs_both_thresholds() -> None:
    assert not GUARD.imbalanced([10, 7])  # spread 3 <= 4
    assert not GUARD.imbalanced([20, 15])  # spread 5 > 4, but 20 < 1.5 * 15
    assert GUARD.imbalanced([5, 0])
    assert not GUARD.imbalanced([7])


def test_affinity_keeps_a_conversation_unless_the_guard_fires() -> None:
    candidates = [Candidate(0, 900, 2, 0), Candidate(1, 0, 2, 0)]
    assert _order(candidates, affinity=1)[0] == 1
    overloaded = [Candidate(0, 900, 0, 0), Candidate(1, 0, 8, 0)]
    assert _order(overloaded, affinity=1)[0] == 0


def test_misses_at_low_load_spread_by_requests_sent() -> None:
    candidates = [Candidate(0, 0, 0, 0, sent=5), Candidate(1, 0, 0, 0, sent=2), Candidate(2, 0, 0, 0, sent=3)]
    assert _order(candidates) == [1, 2, 0]
