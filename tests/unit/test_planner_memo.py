"""The planner's rewrite memo: bounded in bytes by ``--memo-mib`` (non-ASCII text included), and a text seen again
while it is held goes out exactly as it went out before."""

from __future__ import annotations

import sys

import msgspec

from gateway.metrics import Metrics
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from tests.unit.test_meaning_fixtures import run


def _chat(i: int) -> bytes:
    docs = "\n".join(
        f'<document id="{i}-{n}">東京の記録 {i}.{n}: ' + "資料と説明 " * 120 + "</document>" for n in range(4)
    )
    system = f"Answer from the documents.\n<documents>\n{docs}\n</documents>"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}?"}]
    return msgspec.json.encode({"model": "m", "messages": messages})


def test_the_memo_holds_at_most_its_size_in_bytes_of_rewritten_text() -> None:
    planner = Planner(load_settings(environ={}, memo_mib=1), Residency(max_requests=1_000, stateless=False), Metrics())
    for i in range(300):  # each rewritten system text is ~6,000 characters, ~12 KB as Python holds it
        run(planner, "/v1/chat/completions", _chat(i))
    held = [entry.text for entry in planner._memo.values() if entry.text is not None]
    assert 20 < len(held) < 300  # the oldest texts were dropped, the newest are kept
    assert sum(sys.getsizeof(text) for text in held) <= 1 << 20
    assert max(len(text.encode()) for text in held) > 2 * max(len(text) for text in held)  # the bytes, not chars


def test_a_text_sent_again_goes_out_as_before() -> None:
    planner = Planner(load_settings(environ={}), Residency(max_requests=1_000, stateless=False), Metrics())
    first, result = run(planner, "/v1/chat/completions", _chat(7))
    for i in range(20):  # other traffic moves the index in between
        run(planner, "/v1/chat/completions", _chat(100 + i))
    again, result_again = run(planner, "/v1/chat/completions", _chat(7))
    assert again == first
    assert result_again.get("memo_hits", 0) >= 1 and result.get("memo_hits", 0) == 0
