"""Real llama-server (tiny generated model, ``-np 2 --cache-ram 0``): an overlapping RAG workload sent directly
and through the gateway.

Four workloads (``--workload``; default ``both``: the two RAG ones):

- ``bursts``: questions about one document set arrive together, as when many users query the same topic: topics
  of 8 documents each, visited in bursts of 8 queries; each query retrieves 5-8 of its topic's documents
  (Zipf-popular) in its own retrieval-rank order. This is the overlapping workload the target is set for.
- ``overlap``: :func:`bench.workload.generate`'s ``overlap`` preset (Zipf-popular documents shared between queries,
  but topics change on every query), using only which documents each query retrieves, in retrieval-rank order
  (the top 10, so k is 5-10). With two slots that hold one prompt each, little of it can be reused by anyone:
  the note under its table gives the ceiling.
- ``plain``: no retrieved blocks at all: one of five long texts (Zipf-popular) followed by a varying instruction.
- ``chat``: three multi-turn conversations without documents, interleaved at random; each turn resends the
  history. Nothing to reorder in either: the gateway must cache at least as much as direct.
Each document is rendered here as 70-130 random lowercase words of 2-6 letters (the tiny model's tokenizer makes
~3 tokens of such a word, so a document is ~200-400 tokens and a prompt stays under ~3,500 tokens, inside one
slot's 4,096-token context). The documents go as ``<document id="N">`` tags inside ``<documents>`` in the system
message, the question in the user message; ``max_tokens`` 2, ``temperature`` 0, streamed with usage.

The same requests run on two paths, each with its own fresh llama-server (empty caches): directly, and through
the gateway (which reorders the documents so shared ones form a common prefix, and pins each request to the
llama-server slot holding most of its prefix). Requests go one at a time, alternating between the paths (query
i to both, in an order that flips every query), so CPU contention from anything else on the machine falls on
both alike; neither server sees the other's requests, so their caches evolve as in two separate runs.
Reported per path: the engine's cached tokens (``usage.prompt_tokens_details.cached_tokens``) as a share of
prompt tokens, the tokens the engine actually processed (``timings.prompt_n``; independent of machine load), the
summed ``timings.prompt_ms``, and the client-side time to the first content chunk (p50/p99). A last note gives
the workload's ceiling: the share of document tokens an oracle could reuse from what two slots hold.

Run: ``python -m bench llama [--quick] [--queries N] [--seed S]``. Needs ``make llama-server`` (or
``PREFIXGATE_LLAMA_SERVER``); the tiny model is written to the cache on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.proxy_bench import _free_port
from bench.workload import generate

__all__ = ["main"]

TARGET = 0.60  # gateway prompt-processing time at most this share of direct
SLOTS = 2
CTX = 8192  # split between the slots: 4,096 tokens each
MAX_DOCS = 10
PROMPT_BUDGET = 3400  # estimated tokens per prompt; lower-ranked documents are dropped past it (never below 5)
TOKENS_PER_WORD = 3  # measured ~2.85 for 2-6 random lowercase letters with the tiny model's tokenizer
SYSTEM_INTRO = "Answer the question using only the documents below."
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _log(message: str) -> None:
    print(f"[llama] {message}", file=sys.stderr, flush=True)


def _words(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 6))) for _ in range(count)]


BURST = 8  # queries per topic burst
TOPIC_DOCS = 8


def _bursts(n_queries: int, seed: int) -> list[list[int]]:
    """Retrieved document ids per query, in retrieval-rank order, for the ``bursts`` workload."""
    rng = random.Random(f"llama-bench:{seed}:bursts")
    queries: list[list[int]] = []
    topic = 0
    while len(queries) < n_queries:
        docs = list(range(topic * TOPIC_DOCS, (topic + 1) * TOPIC_DOCS))
        weights = [1 / (rank + 1) for rank in range(len(docs))]
        for _ in range(min(BURST, n_queries - len(queries))):
            k = rng.randint(5, 8)
            chosen: list[int] = []
            while len(chosen) < k:
                doc = rng.choices(docs, weights)[0]
                if doc not in chosen:
                    chosen.append(doc)
            queries.append(chosen)
        topic += 1
    return queries


PLAIN_TEXTS = 5  # ``plain``: block-free prompts (a text to work on), Zipf-popular
CONVERSATIONS = 3  # ``chat``: conversations interleaved at random over two slots


def _plain(n_queries: int, seed: int) -> list[dict[str, Any]]:
    """``plain``: no retrieved blocks: one of a few long texts, then a short instruction that varies."""
    rng = random.Random(f"llama-bench:{seed}:plain")
    texts = [" ".join(_words(random.Random(f"llama-bench:{seed}:text:{t}"), 330)) for t in range(PLAIN_TEXTS)]
    weights = [1 / (rank + 1) for rank in range(PLAIN_TEXTS)]
    bodies = []
    for _ in range(n_queries):
        text = rng.choices(texts, weights)[0]
        ask = " ".join(_words(rng, rng.randint(4, 10)))
        messages = [{"role": "user", "content": f"Read this text.\n\n{text}\n\nNow: {ask}"}]
        bodies.append({"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0})
    return bodies


def _chat(n_queries: int, seed: int) -> list[dict[str, Any]]:
    """``chat``: multi-turn conversations without documents; each turn resends the history and one more question."""
    rng = random.Random(f"llama-bench:{seed}:chat")
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": "You are a patient tutor. " + " ".join(_words(rng, 90))}]
        for _ in range(CONVERSATIONS)
    ]
    bodies = []
    for _ in range(n_queries):
        history = rng.choice(histories)
        if len(history) > 1:
            history.append({"role": "assistant", "content": " ".join(_words(rng, 12))})
        history.append({"role": "user", "content": " ".join(_words(rng, rng.randint(30, 60))) + "?"})
        if len(history) > 24:  # a new conversation in its place: the prompt stays inside one slot's context
            del history[1:-1]
        bodies.append({"model": "tiny", "messages": list(history), "max_tokens": 2, "temperature": 0})
    return bodies


def build_requests(n_queries: int, seed: int, workload: str = "bursts") -> list[dict[str, Any]]:
    """The chat request bodies (without ``stream``), deterministic in (n_queries, seed, workload)."""
    if workload == "plain":
        return _plain(n_queries, seed)
    if workload == "chat":
        return _chat(n_queries, seed)
    if workload == "bursts":
        retrieved = _bursts(n_queries, seed)
    else:
        retrieved = [list(q.doc_ids) for q in generate("overlap", seed=seed, n_queries=n_queries).queries]
    numbers: dict[int, int] = {}  # short ids for the tags, in order of first appearance
    texts: dict[int, str] = {}
    bodies = []
    for query_id, doc_ids in enumerate(retrieved):
        chosen: list[int] = []
        estimate = 40
        for doc_id in doc_ids[:MAX_DOCS]:
            numbers.setdefault(doc_id, len(numbers))
            if doc_id not in texts:
                rng = random.Random(f"llama-bench:{seed}:{doc_id}")
                texts[doc_id] = " ".join(_words(rng, rng.randint(70, 130)))
            cost = TOKENS_PER_WORD * texts[doc_id].count(" ") + 12
            if len(chosen) >= 5 and estimate + cost > PROMPT_BUDGET:
                break
            chosen.append(doc_id)
            estimate += cost
        inner = "\n".join(f'<document id="{numbers[doc]}">{texts[doc]}</document>' for doc in chosen)
        rng = random.Random(f"llama-bench:{seed}:question:{query_id}")
        question = " ".join(_words(rng, rng.randint(6, 14))) + "?"
        bodies.append(
            {
                "model": "tiny",
                "messages": [
                    {"role": "system", "content": f"{SYSTEM_INTRO}\n<documents>\n{inner}\n</documents>"},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 2,
                "temperature": 0,
            }
        )
    return bodies


@dataclass
class Result:
    path: str
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    processed_tokens: list[int] = field(default_factory=list)
    prompt_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    reordered: int = 0
    wall_s: float = 0.0


def _stream_one(client: httpx.Client, url: str, body: dict[str, Any], result: Result) -> None:
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first_data = first_content = 0.0
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{url}: status {response.status_code}: {response.text[:500]}")
        header = response.headers.get("x-prefixgate-result")
        if header and json.loads(header).get("reordered"):
            result.reordered += 1
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if not first_data:
                first_data = time.perf_counter() - start
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if not first_content and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                first_content = time.perf_counter() - start
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    if usage is None or timings is None:
        raise RuntimeError(f"{url}: the stream carried no usage/timings (usage={usage}, timings={timings})")
    result.prompt_tokens.append(int(usage["prompt_tokens"]))
    result.cached_tokens.append(int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)))
    result.processed_tokens.append(int(timings.get("prompt_n", 0)))
    result.prompt_ms.append(float(timings["prompt_ms"]))
    result.ttft_ms.append(1000 * (first_content or first_data))
    result.wall_s += time.perf_counter() - start


def _run(bases: dict[str, str], bodies: list[dict[str, Any]]) -> list[Result]:
    """Send every request to each path, one at a time, alternating which path goes first."""
    results = {path: Result(path) for path in bases}
    with httpx.Client(timeout=120.0) as client:
        for i, body in enumerate(bodies):
            order = list(bases) if i % 2 == 0 else list(reversed(bases))
            for path in order:
                _stream_one(client, f"{bases[path]}/v1/chat/completions", body, results[path])
            if (i + 1) % 10 == 0:
                _log(f"{i + 1}/{len(bodies)} queries sent to both paths")
    return list(results.values())


def _doc_tokens(body: dict[str, Any]) -> dict[str, int]:
    """Document tag id -> estimated tokens, for the ceiling estimate."""
    inner = body["messages"][0]["content"].split("<document id=")[1:]
    return {part.split('"')[1]: TOKENS_PER_WORD * part.count(" ") for part in inner}


def reuse_ceiling(bodies: list[dict[str, Any]], slots: int = SLOTS) -> float:
    """Share of document tokens reusable by an oracle that sends each request to the slot (holding only its last
    prompt) sharing the most documents and puts those first, ignoring that the held prompt's order must match."""
    held: list[dict[str, int]] = [{} for _ in range(slots)]
    lru = list(range(slots))
    total = reusable = 0
    for body in bodies:
        docs = _doc_tokens(body)
        total += sum(docs.values())
        shared = [sum(n for doc, n in docs.items() if doc in held[s]) for s in range(slots)]
        best = max(range(slots), key=shared.__getitem__) if max(shared) else lru[0]
        reusable += shared[best]
        held[best] = docs
        lru.remove(best)
        lru.append(best)
    return reusable / max(total, 1)


@contextmanager
def _llama_server(binary: Path, model: Path) -> Iterator[str]:
    from tests.e2e.llama import run_llama_server  # imports pytest; only this benchmark needs it

    with tempfile.TemporaryDirectory(prefix="llama-bench-") as logs:  # a failed start raises with the log's tail
        log_path = Path(logs) / "llama-server.log"
        with run_llama_server(binary, model, slots=SLOTS, ctx=CTX, cache_ram=0, log_path=log_path) as server:
            yield server.url


@contextmanager
def _gateway(upstream: str, engine: str = "llamacpp", extra: Sequence[str] = ()) -> Iterator[str]:
    """A ``prefixgate serve`` process in front of ``upstream``; yields its origin once it is ready."""
    from tests.e2e.servers import stop_process

    port = _free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream, "--engine", engine]
    command += ["--port", str(port), "--log-level", "warning", *extra]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_gateway(base, process, log, slots=engine == "llamacpp")
            yield base
        finally:
            stop_process(process, 10)


def _wait_gateway(base: str, process: subprocess.Popen[bytes], log: Any, slots: bool = True) -> None:
    """Wait for ``/health`` to answer 200 (with ``slots``: and the slot count learnt from llama-server)."""
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            state = f"exited with status {process.returncode}" if process.poll() is not None else "not ready in 30s"
            raise RuntimeError(f"gateway {state}\n{tail}")
        try:
            response = httpx.get(f"{base}/health", timeout=0.5)
            if response.status_code == 200 and (not slots or response.json().get("slots") is not None):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def _locate() -> tuple[Path, Path] | None:
    from tests.builds.llamacpp import ENV_VAR, default_cache_dir, find_llama_server
    from tests.builds.tinymodel import cached_tiny_model

    from_env = os.environ.get(ENV_VAR, "").strip()
    binary = Path(from_env).expanduser() if from_env else find_llama_server()
    if binary is None or not (binary.is_file() and os.access(binary, os.X_OK)):
        where = f"{ENV_VAR}={from_env} is not an executable" if from_env else "no cached llama-server"
        _log(f"skipped: {where}; run `make llama-server` or set {ENV_VAR}")
        return None
    return binary, cached_tiny_model(default_cache_dir())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _table(results: list[Result]) -> str:
    header = (
        f"{'path':<8} {'requests':>8} {'prompt tok':>10} {'cached tok':>10} {'cached':>7} {'processed':>9} "
        f"{'prompt_ms':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'wall s':>7} {'reordered':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        prompt, cached = sum(r.prompt_tokens), sum(r.cached_tokens)
        lines.append(
            f"{r.path:<8} {len(r.prompt_tokens):>8} {prompt:>10} {cached:>10} {cached / max(prompt, 1):>7.1%} "
            f"{sum(r.processed_tokens):>9} "
            f"{sum(r.prompt_ms):>10.0f} {statistics.median(r.ttft_ms):>7.1f}ms {_percentile(r.ttft_ms, 0.99):>7.1f}ms "
            f"{r.wall_s:>7.1f} {r.reordered if r.path == 'gateway' else '-':>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench llama", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 queries instead of ~80")
    parser.add_argument("--queries", type=int, default=None, help="number of queries (overrides --quick)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--workload", choices=("bursts", "overlap", "plain", "chat", "both"), default="both")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    n_queries = args.queries or (30 if args.quick else 80)
    located = _locate()
    if located is None:
        return 1
    workloads = ("bursts", "overlap") if args.workload == "both" else (args.workload,)
    for workload in workloads:
        _compare(located, build_requests(n_queries, args.seed, workload), workload, args.seed)
    return 0


def _compare(located: tuple[Path, Path], bodies: list[dict[str, Any]], workload: str, seed: int) -> None:
    binary, model = located
    docs = [body["messages"][0]["content"].count("<document ") for body in bodies]
    _log(f"{workload}: {len(bodies)} queries, {min(docs)}-{max(docs)} documents each (seed {seed}); -np {SLOTS}")
    rag = workload in ("bursts", "overlap")

    with _llama_server(binary, model) as direct_url, _llama_server(binary, model) as upstream:
        _log(f"direct: fresh llama-server at {direct_url}; gateway: fresh llama-server at {upstream}")
        with _gateway(upstream, extra=["--no-llamacpp-prompt-cache"]) as gateway:  # --cache-ram 0: slots only
            _log(f"gateway ready at {gateway}; sending {len(bodies)} queries to both paths")
            results = _run({"direct": direct_url, "gateway": gateway}, bodies)

    direct, through = results
    share = sum(through.prompt_ms) / max(sum(direct.prompt_ms), 1e-9)
    processed = sum(through.processed_tokens) / max(sum(direct.processed_tokens), 1)
    kind = "RAG chat" if rag else "block-free chat"
    print(f"\nworkload {workload!r}: {len(bodies)} {kind} requests, real llama-server -np {SLOTS} --cache-ram 0")
    print(_table(results))
    if not rag:  # nothing to reorder: the target is never worse than direct
        cached = [sum(r.cached_tokens) / max(sum(r.prompt_tokens), 1) for r in results]
        verdict = "met" if cached[1] >= cached[0] - 0.01 else "NOT met"
        print(
            f"gateway cached share {cached[1]:.1%} vs direct {cached[0]:.1%} (target: >= direct - 1 point: {verdict})"
        )
        print(f"gateway processed tokens = {processed:.0%} of direct")
        return
    verdict = "met" if share <= TARGET else "NOT met"
    print(f"gateway prompt time = {share:.0%} of direct (target <= {TARGET:.0%}: {verdict})")
    print(f"gateway processed tokens = {processed:.0%} of direct")
    print(
        f"note: ceiling for this workload with {SLOTS} slots and no RAM cache: an oracle could reuse "
        f"{reuse_ceiling(bodies):.0%} of document tokens"
    )


if __name__ == "__main__":
    sys.exit(main())
