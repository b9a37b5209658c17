"""RAG chat through prefixgate with the OpenAI SDK, streaming.

Each question comes with documents from a (pretend) retriever, rendered as ``<documents><document id=...>``
inside the user message. The questions retrieve overlapping documents in different orders; prefixgate puts
the documents the engine already holds first, in the order it holds them, so later questions reuse the
earlier ones' KV cache. For every question this prints the streamed answer, the ``X-Prefixgate-Result``
header (what the gateway found and did) and the ``cached_tokens`` the engine reported in the usage chunk.

    make run                          # in another terminal
    .venv/bin/python examples/rag_chat.py [--base-url http://127.0.0.1:8765]

Exits with status 1 when a request fails or the server does not look like prefixgate.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import openai

CORPUS: dict[str, str] = {
    "kv-cache": (
        "A transformer engine keeps the attention keys and values of every token it has processed in a KV cache. "
        "When a new request starts with exactly the same tokens as an earlier one, the engine can skip the "
        "prefill for that shared prefix and reuse the stored keys and values, which cuts time to first token."
    ),
    "radix-tree": (
        "SGLang organises cached prefixes in a radix tree keyed by token ids. A lookup walks the tree from the "
        "root and stops at the first token that differs, so two prompts share cache only up to their first "
        "difference: the order of the documents in a prompt decides how much can be reused."
    ),
    "eviction": (
        "When GPU memory runs short, engines evict cached prefixes, usually the least recently used leaves "
        "first. An evicted prefix has to be prefilled again, so a gateway that plans prompt order should learn "
        "about evictions and stop assuming that evicted documents are still cached."
    ),
    "block-hashing": (
        "vLLM splits the prompt into fixed-size blocks and hashes each block together with the hash of the "
        "block before it. Identical leading blocks therefore map to identical hashes, and the automatic prefix "
        "cache reuses them; one changed token changes the hash of its block and of every block after it."
    ),
    "batching": (
        "Continuous batching admits new requests into the running batch at every decoding step. Requests that "
        "share a cached prefix need less prefill work, so more of them fit into each step and throughput rises "
        "along with the cache hit rate."
    ),
}

# (question, document ids in the retriever's order): overlapping sets, different orders
QUESTIONS: list[tuple[str, list[str]]] = [
    ("What does a KV prefix cache store?", ["kv-cache", "radix-tree", "eviction"]),
    ("Why does document order matter for cache reuse?", ["radix-tree", "eviction", "kv-cache"]),
    ("How does vLLM find a reusable prefix?", ["block-hashing", "kv-cache", "radix-tree", "eviction"]),
    ("What happens to throughput when prefixes are shared?", ["eviction", "batching", "kv-cache", "radix-tree"]),
]

SYSTEM = "Answer the question using only the documents in the user message. Cite document ids."


def build_user_message(question: str, doc_ids: list[str]) -> str:
    documents = "\n".join(f'<document id="{doc_id}">\n{CORPUS[doc_id]}\n</document>' for doc_id in doc_ids)
    return f"<documents>\n{documents}\n</documents>\n\nQuestion: {question}"


def ask(client: openai.OpenAI, model: str, question: str, doc_ids: list[str]) -> dict[str, Any]:
    """Stream one answer; return what the gateway and the engine reported about it."""
    messages: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": build_user_message(question, doc_ids)},
    ]
    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=messages,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        result_header = response.headers.get("x-prefixgate-result")
        request_id = response.headers.get("x-request-id")
        print("  answer: ", end="", flush=True)
        usage = None
        for chunk in response.parse():
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            if chunk.usage is not None:
                usage = chunk.usage
        print()
    cached = None
    if usage is not None and usage.prompt_tokens_details is not None:
        cached = usage.prompt_tokens_details.cached_tokens
    return {
        "request_id": request_id,
        "result": json.loads(result_header) if result_header else None,
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "cached_tokens": cached,
    }


def run(base_url: str, model: str, api_key: str) -> int:
    with openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key, max_retries=0) as client:
        total_prompt = total_cached = 0
        for number, (question, doc_ids) in enumerate(QUESTIONS, 1):
            print(f"[{number}] {question}")
            print(f"  retrieved (retriever order): {', '.join(doc_ids)}")
            outcome = ask(client, model, question, doc_ids)
            print(f"  request id: {outcome['request_id']}")
            if outcome["result"] is None:
                print("error: no X-Prefixgate-Result header: is --base-url a prefixgate gateway?", file=sys.stderr)
                return 1
            print(f"  X-Prefixgate-Result: {json.dumps(outcome['result'])}")
            if outcome["prompt_tokens"] is None:
                print("error: the stream ended without a usage chunk", file=sys.stderr)
                return 1
            print(f"  cached_tokens: {outcome['cached_tokens']} of {outcome['prompt_tokens']} prompt tokens")
            total_prompt += outcome["prompt_tokens"]
            total_cached += outcome["cached_tokens"] or 0
    print(f"summary: {len(QUESTIONS)} questions, {total_cached} of {total_prompt} prompt tokens served from cache")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8765", help="the gateway (default: %(default)s)")
    parser.add_argument("--model", default="sim", help="model name (default: %(default)s)")
    parser.add_argument("--api-key", default="unused", help="a key from the gateway's --api-key, if it has any")
    args = parser.parse_args(argv)
    try:
        return run(args.base_url, args.model, args.api_key)
    except openai.APIError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
