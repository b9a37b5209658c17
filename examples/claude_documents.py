"""Document blocks with citations through prefixgate, with the Anthropic SDK, streaming.

Each question is sent to ``/v1/messages`` with the retrieved documents as Anthropic ``document`` blocks (citations
on) in the user message. The sets overlap and come in different orders; prefixgate moves whole document blocks so
the ones the engine already holds come first, and rewrites the answer's ``document_index`` back to the position of
the document in *this* request, so a citation always names the document it quotes. For every question this prints
the streamed answer, the ``X-Prefixgate-Result`` header, the ``cache_read_input_tokens`` the engine reported and
each citation with the title of the document it points at in the request as sent by the client.

    make run                          # in another terminal
    .venv/bin/python examples/claude_documents.py [--base-url http://127.0.0.1:8765]

Exits with status 1 when a request fails, the server does not look like prefixgate, or a citation points at a
document whose text does not contain what it quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anthropic

CORPUS: dict[str, str] = {
    "prefix-cache": "An engine's prefix cache keeps the keys and values of a prompt's leading tokens, so a later "
    "prompt that starts with the same tokens skips their prefill.",
    "document-order": "Two prompts share cached tokens only up to their first difference, so the order in which "
    "retrieved documents are placed decides how much of a prompt can be reused.",
    "citations": "A citation names its source document by position in the request, so a gateway that moves "
    "documents must translate the position back before the client reads it.",
    "eviction": "Engines evict the least recently used cached prefixes when memory runs short; an evicted prefix "
    "has to be computed again.",
}

QUESTIONS: list[tuple[str, list[str]]] = [
    ("What does a prefix cache save?", ["prefix-cache", "document-order", "eviction"]),
    ("Why does document order matter?", ["document-order", "eviction", "prefix-cache", "citations"]),
    ("How can citations survive reordering?", ["citations", "prefix-cache", "document-order", "eviction"]),
]


def documents(doc_ids: list[str]) -> list[Any]:
    return [
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": CORPUS[doc_id]},
            "title": doc_id,
            "citations": {"enabled": True},
        }
        for doc_id in doc_ids
    ]


def ask(client: anthropic.Anthropic, model: str, question: str, doc_ids: list[str]) -> dict[str, Any]:
    """Stream one answer; return the header, the usage and the citations."""
    content = [*documents(doc_ids), {"type": "text", "text": question}]
    with client.messages.with_streaming_response.create(
        model=model, max_tokens=16, messages=[{"role": "user", "content": content}], stream=True
    ) as response:
        header = response.headers.get("x-prefixgate-result")
        print("  answer: ", end="", flush=True)
        events = list(response.parse())
    message = None
    citations: list[Any] = []
    for event in events:
        if event.type == "message_start":
            message = event.message
        elif event.type == "content_block_delta" and event.delta.type == "text_delta":
            print(event.delta.text, end="", flush=True)
        elif event.type == "content_block_delta" and event.delta.type == "citations_delta":
            citations.append(event.delta.citation)
    print()
    return {"result": json.loads(header) if header else None, "message": message, "citations": citations}


def run(base_url: str, model: str, api_key: str) -> int:
    total_prompt = total_cached = 0
    with anthropic.Anthropic(base_url=base_url.rstrip("/"), api_key=api_key, max_retries=0) as client:
        for number, (question, doc_ids) in enumerate(QUESTIONS, 1):
            print(f"[{number}] {question}")
            print(f"  retrieved (retriever order): {', '.join(doc_ids)}")
            outcome = ask(client, model, question, doc_ids)
            if outcome["result"] is None or outcome["message"] is None:
                print("error: no X-Prefixgate-Result header: is --base-url a prefixgate gateway?", file=sys.stderr)
                return 1
            print(f"  X-Prefixgate-Result: {json.dumps(outcome['result'])}")
            usage = outcome["message"].usage
            cached = usage.cache_read_input_tokens or 0
            print(f"  cache_read_input_tokens: {cached} of {usage.input_tokens + cached} input tokens")
            total_prompt, total_cached = total_prompt + usage.input_tokens + cached, total_cached + cached
            for citation in outcome["citations"]:
                index = getattr(citation, "document_index", None)
                if index is None:
                    continue
                cited = doc_ids[index]
                print(f"  citation: document_index {index} -> {cited!r}: {citation.cited_text!r}")
                if citation.cited_text not in CORPUS[cited]:
                    print(f"error: citation {index} does not quote {cited!r}", file=sys.stderr)
                    return 1
    print(f"summary: {len(QUESTIONS)} questions, {total_cached} of {total_prompt} input tokens served from cache")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8765", help="the gateway (default: %(default)s)")
    parser.add_argument("--model", default="sim", help="model name (default: %(default)s)")
    parser.add_argument("--api-key", default="unused", help="a key from the gateway's --api-key, if it has any")
    args = parser.parse_args(argv)
    try:
        return run(args.base_url, args.model, args.api_key)
    except anthropic.APIError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
