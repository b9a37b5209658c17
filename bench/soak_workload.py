"""The soak's workload: the requests it sends (ordinary, retrieval-augmented, hostile) and how it reads their answers
(``bench.soak_bench`` explains why comparing them with the oracle's is a sound corruption check)."""

from __future__ import annotations

import json
import random
from typing import Any

__all__ = [
    "DOCS_PER_TOPIC",
    "TOPICS",
    "build_request",
    "fact_text",
    "hostile_text",
    "parse_answer",
    "question_text",
]

WORDS = [a + b for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu") for b in ("ba", "do", "fi", "gu", "ho", "je")]
TOPICS = 24
DOCS_PER_TOPIC = 10


def fact_text(topic: int, k: int) -> str:
    rng = random.Random(topic * 1000 + k)
    return f"Fact {topic}.{k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45))) + "."


def question_text(i: int) -> str:
    rng = random.Random(-i - 1)
    filler = " ".join(rng.choice(WORDS) for _ in range(70))
    return f"Using the facts, explain {filler} and cite them (reference {i})."


def hostile_text(i: int) -> str:
    """A prompt built to be expensive or misleading for the detectors; blocks keep the oracle invariants."""
    rng = random.Random(i)
    variant = i % 5
    if variant == 0:  # many distinct numbering styles, then prose (issue 11, item 1)
        styles = rng.randint(100, 200)
        head = "".join(f"Doc{' ' * k}1: some text here\nDoc{' ' * k}2: more text here\n" for k in range(1, styles))
        return head + "ordinary words in a line of prose\n" * 800
    if variant == 1:  # many distinct separator lines
        parts = [f"document text number {k} with enough characters\n{'-' * (3 + k)}\n" for k in range(150)]
        return "Here are the retrieved documents:\n" + "".join(parts) * 2
    if variant == 2:  # identifiers that look like positions
        docs = [fact_text(rng.randrange(TOPICS), k) for k in range(3)]
        return (
            "Context:\n"
            + "".join(f"Article {12 + n}: {doc}\n" for n, doc in enumerate(docs))
            + "\n"
            + "".join(f"## Document {2021 + n} annual report\n{doc}\n\n" for n, doc in enumerate(docs))
        )
    if variant == 3:  # tags that do not pair, an index quoted inside another attribute
        doc = fact_text(rng.randrange(TOPICS), 1)
        return (
            "<documents><document>In DocBook, the <document> element wraps a whole book.</document>\n"
            f'<document>{doc}</document></documents>\n<docs><doc title="see index=\'1\'" index="2">{doc}</doc>\n'
            f'<doc index="3">{doc}</doc></docs>'
        )
    return "word " * 40_000  # one giant line


def build_request(i: int, hostile: bool = False) -> tuple[str, str, dict[str, Any], int]:
    """Request ``i``: (kind label, route, body, number of retrieved blocks; -1: not checked)."""
    if hostile:
        content = f"{hostile_text(i)}\n\n{question_text(i)}"
        body = {"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
        return "hostile", "/v1/chat/completions", body, -1
    rng = random.Random(i)
    chat = i % 4 < 2
    stream = i % 2 == 1
    rag = (i // 4) % 4 != 3
    docs: list[str] = []
    if rag:
        topic = rng.randrange(TOPICS)
        picks = rng.sample(range(DOCS_PER_TOPIC), rng.randint(3, 8))
        docs = [fact_text(topic, k) for k in picks]
    question = question_text(i)
    max_tokens = rng.randint(4, 16)
    body: dict[str, Any] = {"model": "sim", "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        messages = []
        if docs:
            inner = "\n".join(f'<document id="t{i % TOPICS}-{n}">{doc}</document>' for n, doc in enumerate(docs))
            messages.append(
                {"role": "system", "content": f"Answer only from the documents.\n<documents>\n{inner}\n</documents>"}
            )
        messages.append({"role": "user", "content": question})
        body["messages"] = messages
        route = "/v1/chat/completions"
    else:
        context = "\n".join(f"[{n + 1}] {doc}" for n, doc in enumerate(docs))
        body["prompt"] = (f"Sources:\n{context}\n\n" if docs else "") + f"Question: {question}\nAnswer:"
        route = "/v1/completions"
    kind = f"{'chat' if chat else 'completions'} {'stream' if stream else 'json'} {'rag' if rag else 'plain'}"
    return kind, route, body, len(docs)


def parse_answer(chat: bool, stream: bool, status: int, raw: bytes) -> tuple[str, dict[str, Any]] | str:
    """(text, usage) of a well-formed answer, or a string saying what is wrong with it."""
    if status != 200:
        return f"status {status}: {raw[:200]!r}"
    if not stream:
        payload = json.loads(raw)
        choice = payload["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return text, payload["usage"]
    if not raw.endswith(b"data: [DONE]\n\n"):
        return f"stream does not end with [DONE]: {raw[-200:]!r}"
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    for event in raw.split(b"\n\n")[:-2]:
        if not event.startswith(b"data: "):
            return f"not an SSE data event: {event[:100]!r}"
        payload = json.loads(event[6:])
        if "error" in payload:
            return f"error event: {payload['error']}"
        for choice in payload.get("choices") or []:
            pieces.append((choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or "")
        if payload.get("usage"):
            usage = payload["usage"]
    if usage is None:
        return "stream without usage"
    return "".join(pieces), usage
