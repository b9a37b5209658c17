"""The simulated engine's tokenizer: stable ids, lossless pieces, chat prefixes, speed."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engines.sim import tokenizer as tokenizer_module
from engines.sim.tokenizer import IM_END, IM_START, NUM_SPECIAL, TOOLS_START, VOCAB_SIZE, Tokenizer


def _prose(chars: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(3000)]
    parts: list[str] = []
    size = 0
    while size < chars:
        part = rng.choice(words) + rng.choice([" ", " ", " ", ", ", ". ", "\n", "\n\n"])
        parts.append(part)
        size += len(part)
    return "".join(parts)[:chars]


def test_known_ids_are_pinned() -> None:
    # Golden values: changing the tokenizer changes every cached_tokens number in the benchmarks.
    assert Tokenizer().encode("Hello, world!") == (144796, 106422, 21925, 92975)
    assert Tokenizer.pieces("Hello, world!") == ["Hello", ",", " world", "!"]


def test_ids_are_stable_across_processes() -> None:
    text = "The quick brown fox, 12345 jumps\n\nover the lazy dog."
    code = f"from engines.sim.tokenizer import Tokenizer; print(list(Tokenizer().encode({text!r})))"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outputs.add(result.stdout.strip())
    assert outputs == {str(list(Tokenizer().encode(text)))}


@given(st.text())
def test_pieces_concatenate_back_to_the_text(text: str) -> None:
    pieces = Tokenizer.pieces(text)
    assert "".join(pieces) == text
    assert all(pieces)
    assert len(Tokenizer().encode(text)) == len(pieces)


@given(st.text(), st.text())
def test_ids_are_in_the_vocabulary_and_deterministic(a: str, b: str) -> None:
    tok = Tokenizer()
    ids = tok.encode(a + b)
    assert all(NUM_SPECIAL <= i < VOCAB_SIZE for i in ids)
    assert Tokenizer().encode(a + b) == ids


def test_long_text_memo_returns_identical_tokens() -> None:
    tok = Tokenizer()
    text = _prose(5000)
    first = tok.encode(text)
    assert tok.encode(text) is first
    assert Tokenizer().encode(text) == first


def test_memo_limits_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _prose(3000, seed=7)
    expected = Tokenizer().encode(text)
    monkeypatch.setattr(tokenizer_module, "_MEMO_LIMIT", 10)
    monkeypatch.setattr(tokenizer_module, "_TEXT_MEMO_MIN_CHARS", 10**9)
    tok = Tokenizer()
    assert tok.encode(text) == expected
    assert tok.encode(text) == expected


def test_text_memo_is_bounded_by_tokens() -> None:
    tok = Tokenizer(text_memo_tokens=2000)
    for seed in range(10):
        tok.encode(_prose(2000, seed=seed))
    assert tok._text_tokens <= 2000


def test_chat_rendering_uses_role_markers() -> None:
    tok = Tokenizer()
    ids = tok.render_chat([("user", "hi")])
    newline = tok.piece_id("\n")
    assert ids == [
        IM_START,
        *tok.encode("user"),
        newline,
        *tok.encode("hi"),
        IM_END,
        newline,
        IM_START,
        *tok.encode("assistant"),
        newline,
    ]


def test_chat_requests_share_a_prefix_exactly_up_to_the_first_different_message() -> None:
    tok = Tokenizer()
    system = ("system", _prose(2000, seed=3))
    a = tok.render_chat([system, ("user", "what is the capital of France?")])
    b = tok.render_chat([system, ("user", "what is the capital of Spain?")])
    c = tok.render_chat([system, ("user", "who wrote Hamlet")])
    shared_system = len(tok.render_chat([system])) - 4  # minus the assistant header
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert common > shared_system
    common_c = next(i for i, (x, y) in enumerate(zip(a, c, strict=False)) if x != y)
    assert common_c == shared_system + 3  # <|im_start|> user \n, then the contents differ
    # A message that extends another's text does not extend its tokens past the message boundary.
    d = tok.render_chat([("user", "hello")])
    e = tok.render_chat([("user", "hello world")])
    assert d[:4] == e[:4] and d[4] == IM_END and e[4] != IM_END


def test_tools_come_first() -> None:
    tok = Tokenizer()
    ids = tok.render_chat([("user", "x")], tools='[{"type":"function"}]')
    assert ids[0] == TOOLS_START
    assert IM_END in ids[: ids.index(IM_START)]


def test_generated_words_retokenise_to_their_ids() -> None:
    tok = Tokenizer()
    assert tok.encode("kalo mizu") == (tok.piece_id("kalo"), tok.piece_id(" mizu"))


def test_twenty_kilobytes_tokenise_quickly() -> None:
    tok = Tokenizer()
    texts = [_prose(20_000, seed=s) for s in range(4)]
    for text in texts:
        tok.encode(text)
    tok._text_memo.clear()  # measure the tokenizer, not the whole-text memo
    best = float("inf")
    for text in texts:
        start = time.thread_time()  # CPU time: preemption on a busy machine does not count
        tok._encode(text)
        best = min(best, time.thread_time() - start)
    assert len(tok.encode(texts[0])) > 3000
    # ~1 ms on a quiet machine; a per-character Python loop over 20 KB would take tens of ms
    assert best < 0.01, f"20 KB took {best * 1e3:.2f} ms"
