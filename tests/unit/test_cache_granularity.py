"""A replica's cache granularity, learned from the cached tokens its engine reports, rounds the predictions down
(the result header's ``predicted_cached_tokens`` and the stale-prediction check of ``PlannedRequest.usage``)."""

import random

from gateway.metrics import Metrics
from gateway.planning.plan import PlannedRequest
from gateway.planning.residency import CacheGranularity, Residency

# (predicted, reported) pairs seen on the real vLLM CPU server (128-token blocks, issue 22)
VLLM_CPU = [(229, 128), (443, 384), (882, 768), (664, 640), (651, 640)]


def _learned(reports: list[int]) -> CacheGranularity:
    granularity = CacheGranularity()
    for reported in reports:
        granularity.learn(reported)
    return granularity


def test_whole_blocks_learn_the_block_and_the_predictions_match_the_reports() -> None:
    rng = random.Random(3)
    granularity = _learned([128 * rng.randint(1, 40) for _ in range(12)])
    assert granularity.tokens == 128
    assert all(granularity.floor(predicted) == reported for predicted, reported in VLLM_CPU)


def test_a_few_reports_never_learn_a_granularity_too_large() -> None:
    # 384 divides three of these four: a granularity of 384 would predict 233 tokens as 0
    granularity = _learned([384, 768, 384, 640])
    assert granularity.tokens == 128 and granularity.floor(233) == 128


def test_gpu_blocks_learn_16() -> None:
    rng = random.Random(4)
    assert _learned([16 * rng.randint(1, 300) for _ in range(12)]).tokens == 16


def test_token_exact_reports_learn_1() -> None:
    rng = random.Random(5)
    granularity = _learned([rng.randint(1, 5000) for _ in range(32)])
    assert granularity.tokens == 1
    assert granularity.floor(229) == 229


def test_cold_it_changes_nothing() -> None:
    granularity = _learned([128, 256, 384])  # fewer reports than WARM
    assert granularity.tokens == 1 and granularity.floor(229) == 229


def test_one_odd_report_does_not_undo_it_but_many_do() -> None:
    reports = [128 * k for k in (1, 3, 6, 5, 2, 7, 4, 9, 3)]
    granularity = _learned([*reports[:5], 37, *reports[5:]])
    assert granularity.tokens == 128
    rng = random.Random(6)
    for _ in range(CacheGranularity.WINDOW):
        granularity.learn(rng.randint(1, 5000))
    assert granularity.tokens == 1


def test_zero_says_nothing_and_it_stays_bounded() -> None:
    assert _learned([0] * 20).tokens == 1
    assert _learned([4096 * k for k in range(1, 12)]).tokens == 1024  # at most MAX_TOKENS


def _planned(residency: Residency, chars: int, metrics: Metrics) -> PlannedRequest:
    result = {"predicted_cached_tokens": chars // 4}
    return PlannedRequest("r", residency, metrics, result, predictions=[("key", (1, 2))], predicted_chars=chars)


def test_the_header_and_the_stale_check_use_whole_blocks() -> None:
    residency, metrics = Residency(max_requests=100, stateless=False), Metrics()
    for k in range(1, 10):  # the engine reports whole 128-token blocks
        _planned(residency, 4000, metrics).usage(128 * k)
    planned = _planned(residency, 229 * 4, metrics)
    assert planned.result["predicted_cached_tokens"] == 128
    # 443 estimated tokens are 384 in whole blocks: 96 reported is a quarter of that, not stale
    before = metrics.stale_predictions._value.get()
    _planned(residency, 443 * 4, metrics).usage(96)
    assert metrics.stale_predictions._value.get() == before
    _planned(residency, 443 * 4, metrics).usage(95)
    assert metrics.stale_predictions._value.get() == before + 1


def test_predictions_count_tokens_at_the_rate_the_engine_counts_the_prompts_it_was_sent() -> None:
    """A tokenizer that makes a token of every 2.5 bytes (not the default estimate's 4): once four answers
    reported their prompt tokens, a prediction 1,000 bytes into a prompt is 400 tokens, not 250."""
    residency = Residency(max_requests=10, stateless=False)

    def planned(request_id: str, predicted_chars: int, prompt_chars: int) -> PlannedRequest:
        result = {"predicted_cached_tokens": 0}
        return PlannedRequest(request_id, residency, Metrics(), result, predicted_chars=predicted_chars,
                              prompt_chars=prompt_chars)  # fmt: skip

    assert planned("cold", 1000, 3000).predicted_tokens == 250
    for i in range(4):
        planned(f"r{i}", 0, 2500 + 500 * i).usage(None, prompt_tokens=(2500 + 500 * i) * 2 // 5)
    warm = planned("warm", 1000, 3000)
    assert warm.predicted_tokens == 400 and warm.result["predicted_cached_tokens"] == 400
