"""Batch inference planned by prefixgate's index API, run through its OpenAI-compatible endpoint.

1. Each query has a context: the ids of its retrieved documents (as a tokenised pipeline would have them).
2. ``IndexClient.reorder_raw`` plans the batch (``reorder`` gives only the ``(contexts, original_indices)``
   pair; the full answer also has the request ids): ``reordered_contexts`` and ``scheduled_request_ids``
   are in *execution* order, ``request_ids`` in *input* order, and ``original_indices[i]`` is the input
   position of the i-th request to run.
3. Prompts are built in that order, with each context's documents in the planned order, and sent through
   ``/v1/completions`` one after the other, each stamped with its id (``X-Request-Id``) so the engine's
   eviction reports name the ids the index knows. ``X-Prefixgate-Reorder: off``: the order is already
   planned, so the gateway forwards the prompt as built (it still stamps the id).
4. Results are mapped back to input order and printed with the cached tokens the engine reported.

    make run                          # in another terminal
    .venv/bin/python examples/batch_reorder.py [--base-url http://127.0.0.1:8765]

Exits with status 1 when a request fails or an answer does not line up with the plan.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import openai

from gateway.client.api import IndexClient, IndexClientError

# document id -> text; ids are what the retriever and the index API deal in
CORPUS: dict[int, str] = {
    101: "Prefix caching reuses the keys and values of a prompt's leading tokens across requests. " * 3,
    102: "A radix tree indexes cached token sequences so the longest shared prefix is found quickly. " * 3,
    103: "Evicting the least recently used prefixes frees memory when the cache fills up. " * 3,
    104: "Batch schedulers group requests that share documents so they run back to back. " * 3,
    105: "Block hashing chains each block's hash to the previous one, so equal prefixes hash equally. " * 3,
    106: "Time to first token falls when the prefill of a shared prefix can be skipped. " * 3,
}

# (query, retrieved document ids in the retriever's order), in input order
QUERIES: list[tuple[str, list[int]]] = [
    ("How is a shared prefix found?", [102, 101, 105]),
    ("What frees cache memory?", [103, 104, 106]),
    ("Why does prefix reuse cut latency?", [101, 106, 102]),
    ("How are batches grouped?", [104, 103, 101]),
    ("Why do equal prefixes hash equally?", [105, 102, 101]),
    ("What is evicted first?", [106, 103, 104]),
]


@dataclass
class Outcome:
    position: int
    request_id: str
    doc_order: list[int]
    text: str
    prompt_tokens: int
    cached_tokens: int | None


def build_prompt(doc_ids: list[int], query: str) -> str:
    documents = "\n\n".join(f"[doc {doc_id}] {CORPUS[doc_id]}" for doc_id in doc_ids)
    return f"Context:\n{documents}\n\nQuestion: {query}\nAnswer:"


def run(base_url: str, model: str, api_key: str, admin_token: str | None) -> int:
    contexts = [doc_ids for _, doc_ids in QUERIES]
    with IndexClient(base_url, admin_token=admin_token) as index:
        plan = index.reorder_raw(contexts)
    order: list[int] = plan["original_indices"]
    print(f"planned {plan['num_contexts']} contexts in {plan['num_groups']} group(s), mode {plan['mode']}")
    print(f"execution order (input positions): {order}")

    outcomes: dict[int, Outcome] = {}
    with openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key, max_retries=0) as client:
        for position, (input_index, doc_order, request_id) in enumerate(
            zip(order, plan["reordered_contexts"], plan["scheduled_request_ids"], strict=True)
        ):
            # request_ids is in input order; scheduled_request_ids is the same ids in execution order
            if plan["request_ids"][input_index] != request_id:
                print(f"error: request ids do not line up at position {position}", file=sys.stderr)
                return 1
            raw = client.completions.with_raw_response.create(
                model=model,
                prompt=build_prompt(doc_order, QUERIES[input_index][0]),
                max_tokens=8,
                extra_headers={"X-Request-Id": request_id, "X-Prefixgate-Reorder": "off"},
            )
            completion = raw.parse()
            # the id the engine saw; a gateway may namespace client ids (``c-``, or per API key ``k<hex>-``)
            stamped = raw.headers.get("x-request-id", "")
            if not stamped.endswith(request_id):
                print(f"error: sent {request_id}, the gateway answered {stamped or 'no id'}", file=sys.stderr)
                return 1
            usage = completion.usage
            details = usage.prompt_tokens_details if usage is not None else None
            outcomes[input_index] = Outcome(
                position=position,
                request_id=stamped,
                doc_order=doc_order,
                text=completion.choices[0].text.strip(),
                prompt_tokens=usage.prompt_tokens if usage is not None else 0,
                cached_tokens=details.cached_tokens if details is not None else None,
            )
            note = "" if stamped == request_id else f" (stamped as {stamped})"
            print(f"ran #{position}: input {input_index}, docs {doc_order}, id {request_id}{note}")

    print("results in input order:")
    for input_index, (query, retrieved) in enumerate(QUERIES):
        outcome = outcomes[input_index]
        print(
            f"  [{input_index}] {query} retrieved={retrieved} sent={outcome.doc_order} ran #{outcome.position} "
            f"cached_tokens={outcome.cached_tokens}/{outcome.prompt_tokens} answer={outcome.text!r}"
        )
    cached = sum(outcome.cached_tokens or 0 for outcome in outcomes.values())
    prompt = sum(outcome.prompt_tokens for outcome in outcomes.values())
    print(f"summary: {len(outcomes)} requests, {cached} of {prompt} prompt tokens served from cache")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8765", help="the gateway (default: %(default)s)")
    parser.add_argument("--model", default="sim", help="model name (default: %(default)s)")
    parser.add_argument("--api-key", default="unused", help="a key from the gateway's --api-key, if it has any")
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("PREFIXGATE_ADMIN_TOKEN"),
        help="the gateway's --admin-token, if set (default: $PREFIXGATE_ADMIN_TOKEN)",
    )
    args = parser.parse_args(argv)
    try:
        return run(args.base_url, args.model, args.api_key, args.admin_token)
    except (IndexClientError, openai.APIError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
