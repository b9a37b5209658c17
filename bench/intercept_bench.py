"""Cache effect of transparent interception, and the cost of intercept + plan + splice.

Seeded RAG workloads are replayed as unchanged requests in six shapes (OpenAI chat: documents in the system
message as XML, in the user message as a numbered list, in a tool result as JSON, and LangChain's default
stuff-chain prompt rendered by the real library, documents of one to three paragraphs without any marker;
Anthropic Messages: one ``document`` block per document; OpenAI Responses: a ``function_call_output`` holding
the search results as JSON; every other request streams) against the built-in simulated engine, once directly
and once through the gateway (with the engine's eviction callbacks wired to the gateway). Reports the
engine-reported cached-token ratio (whole run, and ``x warm``: the second half of the run) and the simulated
prefill time; for the LangChain shape, how many requests the gateway needed to learn the document boundaries.
Then times the planner alone on 20 KB, 10-block requests.

The tool shape is the "retrieval as a tool turn" layout (system, search call, tool result, then the user's
question): if the per-query question came before the tool result, no two requests could share a prefix
past it, whatever the order of the documents, and the gateway could only match direct access.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.proxy_bench import _free_port, _wait
from bench.workload import Query, Workload, generate
from engines.base import cached_tokens_from_usage, prompt_tokens_from_usage

__all__ = ["main"]

SHAPES = ("system", "user", "tool", "langchain", "messages", "responses")
ROUTES = {"messages": "/v1/messages", "responses": "/v1/responses"}  # the others are chat completions


def _paragraphs(workload: Workload, doc_id: int) -> str:
    """The document as a text splitter's chunk: one to three paragraphs (blank lines inside a document)."""
    words = workload.doc_text(doc_id).split(" ")
    parts = 1 + doc_id % 3
    size = -(-len(words) // parts)
    return "\n\n".join(" ".join(words[i : i + size]) for i in range(0, len(words), size))


class _LangChain:
    """LangChain's default stuff chain for chat models (RetrievalQA's ``CHAT_PROMPT``), rendered by the library
    through ``ChatOpenAI`` with a transport that captures the request instead of sending it."""

    def __init__(self) -> None:
        from langchain_classic.chains.combine_documents import create_stuff_documents_chain
        from langchain_classic.chains.question_answering.stuff_prompt import CHAT_PROMPT
        from langchain_openai import ChatOpenAI

        self.captured: list[dict[str, Any]] = []
        reply = {"id": "c", "object": "chat.completion", "created": 0, "model": "sim", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}  # fmt: skip

        def capture(request: httpx.Request) -> httpx.Response:
            self.captured.append(json.loads(request.content))
            return httpx.Response(200, json=reply)

        client = httpx.Client(transport=httpx.MockTransport(capture))
        llm = ChatOpenAI(model="sim", api_key="none", base_url="http://capture/v1", http_client=client)  # type: ignore[arg-type]
        self.chain = create_stuff_documents_chain(llm, CHAT_PROMPT)

    def __call__(self, docs: list[str], question: str) -> dict[str, Any]:
        from langchain_core.documents import Document

        self.chain.invoke({"context": [Document(page_content=text) for text in docs], "question": question})
        return {**self.captured[-1], "max_tokens": 4}


def render(workload: Workload, query: Query, shape: str, langchain: _LangChain | None = None) -> dict[str, Any]:
    """One unchanged request body, as a RAG app or agent would build it, documents in retrieval order."""
    question = " ".join(f"q{t}" for t in query.question)
    if shape == "langchain":
        assert langchain is not None
        return langchain([_paragraphs(workload, d) for d in query.doc_ids], question)
    docs = [workload.doc_text(d) for d in query.doc_ids]
    if shape in ROUTES:
        return _agent_body(query, docs, question, shape)
    if shape == "system":
        inner = "\n".join(f'<document id="d{d}">{text}</document>' for d, text in zip(query.doc_ids, docs, strict=True))
        messages = [
            {"role": "system", "content": f"Answer from the documents.\n<documents>\n{inner}\n</documents>"},
            {"role": "user", "content": question},
        ]
    elif shape == "user":
        numbered = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(docs, 1))
        messages = [
            {"role": "system", "content": "You answer questions."},
            {"role": "user", "content": f"Sources:\n\n{numbered}\n\nQuestion: {question}\nAnswer:"},
        ]
    else:
        results = [{"id": f"d{d}", "text": text} for d, text in zip(query.doc_ids, docs, strict=True)]
        call = {"id": "call_search", "type": "function", "function": {"name": "search", "arguments": "{}"}}
        messages = [
            {"role": "system", "content": "You are a research agent."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"results": results})},
            {"role": "user", "content": question},
        ]
    return {"model": "sim", "messages": messages, "max_tokens": 4}


def _agent_body(query: Query, docs: list[str], question: str, shape: str) -> dict[str, Any]:
    """Anthropic Messages (one ``document`` block per document) or Responses (search results as a tool output)."""
    if shape == "messages":
        blocks: list[Any] = [
            {
                "type": "document",
                "source": {"type": "text", "media_type": "text/plain", "data": text},
                "title": f"d{d}",
            }
            for d, text in zip(query.doc_ids, docs, strict=True)
        ]
        content = [*blocks, {"type": "text", "text": question}]
        return {"model": "sim", "max_tokens": 4, "system": "Answer from the documents.",
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
    results = [{"id": f"d{d}", "text": text} for d, text in zip(query.doc_ids, docs, strict=True)]
    items = [
        {"type": "function_call", "call_id": "call_search", "name": "search", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_search", "output": json.dumps({"results": results})},
        {"role": "user", "content": question},
    ]
    return {"model": "sim", "instructions": "You are a research agent.", "input": items, "max_output_tokens": 4}


def _usage(response: httpx.Response, stream: bool) -> tuple[int, int, float]:
    """Prompt tokens, cached tokens and simulated prefill time of one answer, whichever API it speaks."""
    if not stream:
        payload = response.json()
    else:
        payload = {}
        for line in response.text.splitlines():
            if line.startswith("data: {") and '"usage"' in line:
                candidate = json.loads(line[6:])
                if cached_tokens_from_usage(candidate) is not None:
                    payload = candidate
    prompt, cached = prompt_tokens_from_usage(payload), cached_tokens_from_usage(payload)
    assert prompt is not None and cached is not None, "the engine reported no usage"
    return prompt, cached, payload["timings"]["prompt_ms"]


def replay(
    base: str, bodies: list[dict[str, Any]], shape: str = "system", found: list[int] | None = None
) -> tuple[int, int, float, float]:
    """Send every body; return prompt tokens, cached tokens, prefill ms and the cached share of the second half
    (warm); ``found`` gets each request's blocks."""
    prompt = cached = 0
    warm = [0, 0]
    prefill_ms = 0.0
    route = ROUTES.get(shape, "/v1/chat/completions")
    with httpx.Client(timeout=60) as client:
        for i, original in enumerate(bodies):
            stream = i % 2 == 1
            body = {**original, "stream": True} if stream else original
            if stream and route == "/v1/chat/completions":
                body["stream_options"] = {"include_usage": True}
            response = client.post(f"{base}{route}", json=body)
            response.raise_for_status()
            if found is not None:
                found.append(json.loads(response.headers.get("x-prefixgate-result", "{}")).get("blocks", 0))
            p, c, ms = _usage(response, stream)
            prompt, cached, prefill_ms = prompt + p, cached + c, prefill_ms + ms
            if i >= len(bodies) // 2:
                warm[0], warm[1] = warm[0] + p, warm[1] + c
    return prompt, cached, prefill_ms, warm[1] / max(1, warm[0])


def _cache_effect(
    presets: Sequence[str], queries: int, capacity: int, shapes: Sequence[str] = SHAPES
) -> list[tuple[Any, ...]]:
    sim_port, gw_port = _free_port(), _free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "engines.sim", "--port", str(sim_port), "--capacity-tokens", str(capacity),
         "--prefill-us", "2", "--log-level", "warning", "--evict-url", f"http://127.0.0.1:{gw_port}/evict"]
    )  # fmt: skip
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--upstream", f"http://127.0.0.1:{sim_port}",
         "--port", str(gw_port), "--log-level", "warning"]
    )  # fmt: skip
    rows = []
    langchain = _LangChain() if "langchain" in shapes else None
    try:
        _wait(f"http://127.0.0.1:{sim_port}/health")
        _wait(f"http://127.0.0.1:{gw_port}/health")
        for preset in presets:
            workload = generate(preset, seed=0, n_queries=queries)
            for shape in shapes:
                bodies = [render(workload, q, shape, langchain) for q in workload.queries]
                results = []
                found: list[int] = []
                for base in (f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"):
                    httpx.post(f"http://127.0.0.1:{sim_port}/sim/reset")
                    httpx.post(f"http://127.0.0.1:{gw_port}/reset")
                    results.append(replay(base, bodies, shape, found if base.endswith(str(gw_port)) else None))
                learning = (
                    _convergence(found, [len(q.doc_ids) for q in workload.queries]) if shape == "langchain" else None
                )
                rows.append((preset, shape, len(bodies), *results, learning))
                print(f"  {preset:<12} {shape:<7} done", file=sys.stderr, flush=True)
    finally:
        for process in (gateway, sim):
            process.terminate()
            process.wait(timeout=10)
    return rows


def _convergence(found: list[int], sizes: list[int], window: int = 50) -> tuple[int | None, float]:
    """When boundary learning converged: the first request from which the share of documents found as their own
    block, over the next ``window`` requests, reaches 90% of its share over the last ``window`` requests (the
    steady state: a document retrieved for the first time is never split off); and that steady share."""
    shares = [min(f, n) / n for f, n in zip(found, sizes, strict=True)]
    if len(shares) < 2 * window:
        return None, sum(shares) / max(1, len(shares))
    steady = sum(shares[-window:]) / window
    for start in range(len(shares) - window + 1):
        if sum(shares[start : start + window]) / window >= 0.9 * steady:
            return start + 1, steady
    return None, steady


def _planner_latency(samples: int) -> dict[str, tuple[float, float]]:
    from gateway.metrics import Metrics
    from gateway.planning.planner import Planner
    from gateway.planning.residency import Residency
    from gateway.settings import load_settings
    from gateway.wire.chat import CHAT_ROUTE, decode_request

    settings = load_settings(environ={})
    planner = Planner(settings, Residency(max_requests=200_000, stateless=False), Metrics())
    workload = generate("overlap", seed=1, n_queries=samples * 2)
    timings: dict[str, list[float]] = {"miss (new text)": [], "hit (resent text)": []}
    sizes = []
    for generated in workload.queries[:samples]:
        query = Query(generated.query_id, tuple((list(generated.doc_ids) * 2)[:10]), generated.question, 0, 1)
        body = json.dumps(render(workload, query, "system")).encode()
        sizes.append(len(body))
        for values in timings.values():
            start = time.perf_counter()
            planned = planner.plan(planner.read(decode_request(body, CHAT_ROUTE), {}), "req-bench")
            values.append(time.perf_counter() - start)
            planned.accept()
    print(f"  planner requests: median body {statistics.median(sizes) / 1024:.1f} KB, 10 blocks", file=sys.stderr)
    return {label: (_pct(values, 0.5), _pct(values, 0.99)) for label, values in timings.items()}


def _chart(rows: list[tuple[Any, ...]], capacity: int) -> Path:
    """Hit ratio and simulated prefill time, direct vs gateway, per preset and shape: ``bench/out/intercept.png``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = [f"{preset}\n{shape}" for preset, shape, *_ in rows]
    rows = [row[:5] for row in rows]
    positions = range(len(rows))
    figure, (hits, prefill) = pyplot.subplots(2, 1, figsize=(11, 7), sharex=True)
    for axis, pick, title in (
        (hits, lambda r: 100 * r[1] / r[0], "engine-reported cached tokens (% of prompt tokens)"),
        (prefill, lambda r: r[2] / 1000, "simulated prefill time (s)"),
    ):
        axis.bar([p - 0.2 for p in positions], [pick(row[3]) for row in rows], 0.4, label="direct")
        axis.bar([p + 0.2 for p in positions], [pick(row[4]) for row in rows], 0.4, label="through prefixgate")
        axis.set_title(title)
        axis.legend()
    prefill.set_xticks(list(positions), labels, fontsize=8)
    figure.suptitle(f"Transparent reordering vs direct access (simulated engine, {capacity // 1024}k-token KV cache)")
    figure.tight_layout()
    out = Path(__file__).resolve().parent / "out" / "intercept.png"
    out.parent.mkdir(exist_ok=True)
    figure.savefig(out, dpi=110)
    pyplot.close(figure)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench intercept", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200 queries per preset and shape")
    parser.add_argument("--queries", type=int, default=600)
    parser.add_argument("--capacity", type=int, default=262_144, help="simulated KV capacity in tokens")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--presets", default="overlap,heavy-head,low-overlap", help="comma list of workload presets")
    args, _ = parser.parse_known_args(argv)
    queries = 200 if args.quick else args.queries
    shapes = tuple(shape for shape in args.shapes.split(",") if shape)
    if unknown := set(shapes) - set(SHAPES):
        parser.error(f"unknown shapes: {sorted(unknown)}")
    rows = _cache_effect([p for p in args.presets.split(",") if p], queries, args.capacity, list(shapes))
    print(f"\nTransparent interception vs direct, simulated engine ({args.capacity // 1024}k-token KV cache, "
          f"{queries} requests per row, half streamed)")  # fmt: skip
    header = f"{'preset':<12}{'shape':<10}{'direct hit':>11}{'gateway hit':>13}{'x':>7}{'x warm':>8}"
    header += f"{'direct prefill':>16}{'gw prefill':>12}"
    print(header)
    print("-" * len(header))
    for preset, shape, _n, direct, through, _learning in rows:
        d_ratio = direct[1] / direct[0]
        g_ratio = through[1] / through[0]
        factor = g_ratio / d_ratio if d_ratio else float("inf")
        warm = through[3] / direct[3] if direct[3] else float("inf")
        print(f"{preset:<12}{shape:<10}{d_ratio:>11.1%}{g_ratio:>13.1%}{factor:>7.2f}{warm:>8.2f}"
              f"{direct[2] / 1000:>14.2f} s{through[2] / 1000:>10.2f} s")  # fmt: skip
    print(
        "\nLangChain default prompt (CHAT_PROMPT, documents without metadata, 1-3 paragraphs each): boundary learning"
    )
    for preset, _shape, n, _direct, _through, learning in rows:
        if learning is not None:
            converged, steady = learning
            when = f"after {converged} requests" if converged is not None else "not within the run"
            print(f"  {preset:<12} converged {when} of {n}; steady state: {steady:.0%} of documents found as blocks")
    chart = _chart(rows, args.capacity)
    print(f"\nchart: {chart}")
    latency = _planner_latency(300 if args.quick else 1000)
    print("\nIntercept + plan + splice (in process, ~20 KB chat body, 10 XML blocks)")
    print(f"{'case':<20}{'p50':>10}{'p99':>10}")
    for label, (p50, p99) in latency.items():
        print(f"{label:<20}{p50:>8.3f}ms{p99:>8.3f}ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
