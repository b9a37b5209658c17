"""``prefixgate reorder FILE``: a large batch sent to a running gateway's ``/reorder`` in chunks, with progress.

The contexts (a JSON list, or an object with ``contexts`` and optionally ``conversation_ids``, one per context)
go in chunks; on a stateful gateway each chunk is planned against what the earlier chunks committed, so
chunking loses little sharing. Chunks run in input order, and inside a chunk the turns of one conversation
keep their input order, so a later turn never runs before an earlier one. The output has the
index API's contract over the whole batch: ``reordered_contexts[i]`` belongs to
``contexts[original_indices[i]]``, and ``request_ids`` is in input order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.client.api import IndexClient, IndexClientError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixgate reorder", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="JSON file with the contexts ('-' for standard input)")
    parser.add_argument("--url", default="http://127.0.0.1:8765", help="the gateway's base URL")
    parser.add_argument("--admin-token", default=None, help="the gateway's admin token, if it has one")
    parser.add_argument("--chunk", type=int, default=5000, help="contexts per request (default 5000)")
    parser.add_argument("--stateless", action="store_true", help="use /schedule: leave the live index alone")
    parser.add_argument("--output", default="-", help="where to write the result JSON (default standard output)")
    return parser


def _load(source: str) -> tuple[list[Any], list[str | None] | None]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    data = json.loads(text)
    contexts = data.get("contexts") if isinstance(data, dict) else data
    if not isinstance(contexts, list):
        raise ValueError("expected a JSON list of contexts, or an object with a 'contexts' list")
    conversations = data.get("conversation_ids") if isinstance(data, dict) else None
    if conversations is not None and (not isinstance(conversations, list) or len(conversations) != len(contexts)):
        raise ValueError("'conversation_ids' must be a list with one entry per context")
    return contexts, conversations


def _progress(done: int, total: int, started: float) -> None:
    end = "\n" if done == total or not sys.stderr.isatty() else "\r"
    elapsed = time.perf_counter() - started
    print(f"reorder: {done}/{total} contexts ({done / total:.0%}) in {elapsed:.1f} s", end=end, file=sys.stderr)


def reorder_in_chunks(
    client: IndexClient,
    contexts: Sequence[Any],
    chunk: int,
    stateless: bool,
    conversations: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Send ``contexts`` in chunks; merge the answers into one with the index API's contract."""
    reordered: list[Any] = []
    order: list[int] = []
    request_ids: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(contexts), chunk):
        part = list(contexts[start : start + chunk])
        turns = list(conversations[start : start + chunk]) if conversations is not None else None
        if stateless:
            answer = client.schedule(part, conversation_ids=turns)
        else:
            answer = client.reorder_raw(part, conversation_ids=turns)
        reordered += answer["reordered_contexts"]
        order += [start + index for index in answer["original_indices"]]
        request_ids += answer["request_ids"]
        _progress(start + len(part), len(contexts), started)
    return {
        "reordered_contexts": reordered,
        "original_indices": order,
        "request_ids": request_ids,
        "scheduled_request_ids": [request_ids[i] for i in order],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.chunk < 1:
        print("prefixgate reorder: error: --chunk must be at least 1", file=sys.stderr)
        return 2
    try:
        contexts, conversations = _load(args.input)
        with IndexClient(args.url, admin_token=args.admin_token, timeout=600.0) as client:
            result = reorder_in_chunks(client, contexts, args.chunk, args.stateless, conversations) if contexts else {}
    except (OSError, ValueError, IndexClientError) as exc:
        print(f"prefixgate reorder: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result)
    if args.output == "-":
        print(text)
    else:
        Path(args.output).write_text(text + "\n")
    return 0
