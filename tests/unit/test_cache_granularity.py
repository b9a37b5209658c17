"""A replica's cache granularity, learned from the cached tokens its engine reports, rounds the predictions down
(the result header's ``predicted_cached_tokens`` and the stale-prediction check of ``PlannedRequest.usage``)."""

import json
import random
from pathlib import Path
from typing import Any

import httpx

from gateway.app import _replicas
from gateway.metrics import Metrics
from gateway.planning.intercept import find_groups
from gateway.planning.outcome import follows
from gateway.planning.plan import PlannedRequest
from gateway.planning.planner import Planner
from gateway.planning.residency import BlockTokens, CacheGranularity, Residency
from gateway.settings import load_settings
from gateway.wire.chat import decode_request

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
    # 384 divides three of these four: a granularity of 384 would predict 233 tokens as 0; and four multiples of
    # 128 are 64-token blocks one time in sixteen, so it takes 64 until more reports confirm 128
    granularity = _learned([384, 768, 384, 640])
    assert granularity.tokens == 64 and granularity.floor(233) == 192
    for reported in (128, 896, 1152, 384):
        granularity.learn(reported)
    assert granularity.tokens == 128 and granularity.floor(233) == 128


def test_even_multiples_do_not_double_the_block_until_enough_confirm_it() -> None:
    """Seen on the real vLLM CPU server: 128-token blocks whose first reports happened to be 256, 512 and 768 were
    learned as 256, and a prefix of 908 tokens was predicted as 768 instead of 896."""
    granularity = _learned([256, 512, 768, 512, 256])
    assert granularity.tokens < 256 and granularity.floor(908) >= 896
    rng = random.Random(7)
    for _ in range(8):  # eight more multiples of 256: a 128-token block would have shown an odd one by now
        granularity.learn(256 * rng.randint(1, 8))
    assert granularity.tokens == 256
    granularity.learn(896)  # one odd multiple of 128 is enough: no engine caching in 256-token blocks reports it
    assert granularity.tokens == 128


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


def _tokenizer_file(tmp_path: Path) -> Path:
    """A byte-level BPE tokenizer trained here (the ``tokenizer`` extra; no download), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    rng = random.Random(9)
    words = ["cache", "prefix", "engine", "token", "replica", "router", "index", "block"]
    bpe.train_from_iterator([" ".join(rng.choices(words, k=40)) for _ in range(200)], trainer=trainer)
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    return path


def test_block_tokens_count_each_text_exactly_once(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = _tokenizer_file(tmp_path)
    counter, reference = BlockTokens(str(path), size=2), Tokenizer.from_file(str(path))
    text = "the cache engine routes a prefix to the replica that holds its block"
    assert counter.count(text) == len(reference.encode(text, add_special_tokens=False).ids) > 0
    counter._tokenizer = None  # type: ignore[assignment]  # a second count is remembered, not tokenized again
    assert counter.count(text) == len(reference.encode(text).ids)


def test_with_exact_block_counts_only_the_bytes_between_blocks_are_estimated() -> None:
    """Blocks ending within the predicted prefix count their exact tokens; the rest of the prefix, at the rate the
    engine counts the prompt around the blocks (learned on the prompt less its blocks)."""
    residency = Residency(max_requests=10, stateless=False)
    # (end, chars, exact tokens) of three blocks of 400 characters: 150 tokens each (2.67 bytes a token)
    counted = [(500, 400, 150), (900, 400, 150), (1300, 400, 150)]

    def planned(request_id: str, predicted_chars: int) -> PlannedRequest:
        result = {"predicted_cached_tokens": 0}
        return PlannedRequest(request_id, residency, Metrics(), result, predicted_chars=predicted_chars,
                              prompt_chars=1500, counted=counted)  # fmt: skip

    # cold: the 100 characters before the first block at the default 4 bytes a token
    assert planned("cold", 900).predicted_tokens == 150 + 150 + 100 // 4
    for i in range(4):  # the prompt less its blocks (300 chars) counted 100 tokens: 3 bytes a token
        planned(f"r{i}", 0).usage(None, prompt_tokens=450 + 100)
    assert planned("warm", 900).predicted_tokens == 150 + 150 + 100 // 3
    assert planned("past", 1400).predicted_tokens == 3 * 150 + 200 // 3


DOCS = [f'<document id="{i}">' + " ".join(random.Random(i).choices(["cache", "engine", "block", "prefix"], k=30))
        + "</document>" for i in range(6)]  # fmt: skip


def _rag(order: list[int], question: str) -> bytes:
    system = "answer from the documents.\n<documents>\n" + "\n".join(DOCS[i] for i in order) + "\n</documents>"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return json.dumps({"model": "m", "messages": messages}).encode()


def test_past_a_cached_block_the_cache_matches_the_template_the_next_block_starts_with() -> None:
    """vLLM matched 895 tokens where the third cached document ended at 890: the next bytes of the cached prompt
    were the separator and ``<document id="``, as this request's are, whichever document comes next."""
    text = _rag([0, 1, 2], "q").decode()
    text = json.loads(text)["messages"][0]["content"]
    (group,) = find_groups(text)
    assert follows(text, group) == (1 + len('<document id="'), 1 + len('<document id="'), 0)


def test_with_a_tokenizer_every_text_is_counted_and_only_the_chat_template_is_learned(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = _tokenizer_file(tmp_path)
    reference = Tokenizer.from_file(str(path))
    residency = Residency(max_requests=100, stateless=False)
    planner = Planner(load_settings(environ={}), residency, Metrics(), tokens=BlockTokens(str(path)))

    def plan(order: list[int], question: str, request_id: str) -> tuple[PlannedRequest, dict[str, Any]]:
        request = decode_request(_rag(order, question), "/v1/chat/completions")
        planned = planner.plan(planner.read(request, {}), request_id)
        request.update(planned.fields)
        return planned, json.loads(request.encode())

    def tokens(text: str) -> int:
        return len(reference.encode(text, add_special_tokens=False).ids)

    first, body = plan([0, 1, 2, 3], "which block?", "a")
    first.accept()
    texts = [m["content"] for m in body["messages"]]
    assert sum(count for _, _, count in first.counted) == sum(tokens(t) for t in texts)  # both texts, whole
    for _ in range(4):  # the engine wraps the two texts in 3 runs of its template: 20 tokens (6, 6 and 8)
        first.usage(None, prompt_tokens=sum(tokens(t) for t in texts) + 20)
    sent = sorted(range(4), key=lambda i: texts[0].index(DOCS[i]))  # the order the engine holds
    second, body = plan([sent[2], 5, sent[0], sent[1]], "which engine?", "b")
    assert second.result["predicted_cached_blocks"] == 3
    system = body["messages"][0]["content"]
    # the cached prefix: the system text up to the third cached document and the next one's lead, and one run of
    # template (20 // 3, rounded down: the first run closes no earlier message)
    reach = system.index(DOCS[sent[2]]) + len(DOCS[sent[2]]) + len('\n<document id="')
    assert second.predicted_tokens == tokens(system[:reach]) + 6
    assert second.result["predicted_cached_tokens"] == second.predicted_tokens


def test_replicas_of_one_engine_kind_learn_its_granularity_together() -> None:
    settings = load_settings(
        environ={}, upstream=("vllm=http://a:8000", "vllm=http://b:8000", "llamacpp=http://c:8080")
    )
    replicas = _replicas(settings, httpx.MockTransport(lambda request: httpx.Response(200)), Metrics())
    first, second, third = (replica.residency for replica in replicas.replicas)
    assert first.granularity is second.granularity and first.rate is second.rate
    assert third.granularity is not first.granularity and third.rate is not first.rate
    assert first.index is not second.index
    # llama.cpp holds a prompt once (``Residency.reuse_overwrites``): the planner moves nothing it predicts no gain of
    assert (first.reuse_overwrites, second.reuse_overwrites, third.reuse_overwrites) == (False, False, True)


def test_an_engine_that_evicted_a_prompts_tail_holds_only_the_blocks_before_it() -> None:
    """KV events say how many tokens of a request's prompt the engine still holds (``KVEventTracker.on_shortened``):
    its path in the index keeps the blocks that end within them, and a later group of the prompt goes."""
    residency = Residency(max_requests=10, stateless=False)
    residency.track_extents()
    commits = (("k", (1, 2, 3, 4)), ("k2", (7, 8)))
    # at the default 4 characters a token, the blocks end at tokens 25, 50, 75, 100 and 150, 200
    planned = PlannedRequest("r", residency, Metrics(), {}, commits=commits,
                             extents=((100, 200, 300, 400), (600, 800)))  # fmt: skip
    planned.accept()
    assert residency.index.cached("k", (1, 2, 3, 4)) == 4 and residency.index.path("r.g2") == (7, 8)
    residency.shorten({"r": 60, "unknown": 10})
    assert residency.index.path("r") == (1, 2) and residency.index.path("r.g2") is None
    assert residency.index.cached("k", (4, 3, 2, 1)) == 2
    residency.shorten({"r": 10})
    assert residency.index.path("r") is None


def test_without_kv_events_nothing_is_kept_for_shortening() -> None:
    residency = Residency(max_requests=10, stateless=False)
    PlannedRequest("r", residency, Metrics(), {}, commits=(("k", (1, 2)),), extents=((100, 200),)).accept()
    residency.shorten({"r": 30})
    assert residency.extents is None and residency.index.path("r") == (1, 2)
