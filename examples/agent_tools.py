"""An agent turn with a search tool, then a follow-up turn that resends the history, through prefixgate.

Turn 1: the conversation holds the user's question, the assistant's ``search_docs`` tool call and the tool
result, a JSON ``{"results": [...]}`` list of documents. prefixgate finds the documents in the tool message
and reorders them for the prefix cache (``X-Prefixgate-Result`` says so).

Turn 2: the client resends the whole history (with the original, unreordered tool result, as agent
frameworks do) plus the answer and a follow-up question. prefixgate rewrites the tool message exactly as in
turn 1 (``memo_hits``), so the prompt forwarded in turn 2 starts with turn 1's prompt byte for byte and the
engine reports that prefix as cached. (The assistant's tool call is scripted: the simulated engine does not
call tools.)

    make run                          # in another terminal
    .venv/bin/python examples/agent_tools.py [--base-url http://127.0.0.1:8765]

Exits with status 1 when a request fails, or when the engine reports cached tokens and turn 2 did not reuse
turn 1's whole prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import openai

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the engineering wiki; returns the best matching documents.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    }
]

SEARCH_RESULTS: list[dict[str, Any]] = [
    {
        "id": "wiki-17",
        "title": "Prefix caching in SGLang",
        "score": 0.91,
        "content": "SGLang keeps cached prefixes in a radix tree and reuses the longest match for each new request. "
        "Evicted leaves are reported through a callback so an external index can follow along.",
    },
    {
        "id": "wiki-04",
        "title": "Prefix caching in vLLM",
        "score": 0.87,
        "content": "vLLM hashes fixed-size blocks, chaining each hash to the block before it, and frees unused "
        "blocks in least-recently-used order when memory runs short.",
    },
    {
        "id": "wiki-22",
        "title": "llama.cpp slots",
        "score": 0.80,
        "content": "llama-server keeps one cached prompt per slot; pinning a request to the slot holding its longest "
        "shared prefix avoids recomputing it.",
    },
    {
        "id": "wiki-09",
        "title": "Choosing an engine",
        "score": 0.72,
        "content": "All three engines speak the OpenAI API, so clients can move between them by changing a base URL; "
        "cache reporting must be switched on explicitly in SGLang and vLLM.",
    },
]


def first_turn() -> list[Any]:
    return [
        {"role": "system", "content": "You are a research agent. Search the wiki, then answer from the results."},
        {"role": "user", "content": "Which engines cache prompt prefixes, and how do they free memory?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_search_1",
                    "type": "function",
                    "function": {"name": "search_docs", "arguments": json.dumps({"query": "prefix cache eviction"})},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_search_1",
            "content": json.dumps({"results": SEARCH_RESULTS}, indent=2),
        },
    ]


def send(client: openai.OpenAI, model: str, messages: list[Any]) -> tuple[str, dict[str, Any], int, int | None]:
    """One non-streamed turn: (answer, X-Prefixgate-Result, prompt tokens, cached tokens)."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, tools=TOOLS, max_tokens=12)
    completion = raw.parse()
    header = raw.headers.get("x-prefixgate-result")
    if header is None:
        raise RuntimeError("no X-Prefixgate-Result header: is --base-url a prefixgate gateway?")
    if completion.usage is None:
        raise RuntimeError("the engine reported no usage")
    details = completion.usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else None
    return completion.choices[0].message.content or "", json.loads(header), completion.usage.prompt_tokens, cached


def run(base_url: str, model: str, api_key: str) -> int:
    with openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key, max_retries=0) as client:
        history = first_turn()
        print(f"turn 1: {len(history)} messages, tool result with {len(SEARCH_RESULTS)} documents")
        answer, result, prompt_1, cached_1 = send(client, model, history)
        print(f"  X-Prefixgate-Result: {json.dumps(result)}")
        print(f"  answer: {answer}")
        print(f"  prompt_tokens: {prompt_1}, cached_tokens: {cached_1}")

        history += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Which of them needs cache reporting switched on?"},
        ]
        print(f"turn 2: resending the history, {len(history)} messages")
        answer, result, prompt_2, cached_2 = send(client, model, history)
        print(f"  X-Prefixgate-Result: {json.dumps(result)}")
        print(f"  answer: {answer}")
        print(f"  prompt_tokens: {prompt_2}, cached_tokens: {cached_2}")

    if cached_2 is None:
        print("turn 2: the engine does not report cached tokens; nothing to compare")
        return 0
    # everything turn 1 sent is a prefix of turn 2's prompt, except the generation prompt turn 1 ended with
    reused = cached_2 >= prompt_1 - 8
    print(f"turn 2 reused turn 1's prompt: {'yes' if reused else 'no'} ({cached_2} cached of turn 1's {prompt_1})")
    return 0 if reused else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8765", help="the gateway (default: %(default)s)")
    parser.add_argument("--model", default="sim", help="model name (default: %(default)s)")
    parser.add_argument("--api-key", default="unused", help="a key from the gateway's --api-key, if it has any")
    args = parser.parse_args(argv)
    try:
        return run(args.base_url, args.model, args.api_key)
    except (openai.APIError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
