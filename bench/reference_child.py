"""Runs inside the ContextPilot 0.5.0 venv that ``bench.reference`` builds: its own package, nothing of ours.

A line protocol on stdin/stdout (one JSON object per line); ContextPilot's own prints go to stderr:

- ``{"op": "batch", "contexts": [[doc, ...], ...]}`` -> ``{"reordered": [...], "order": [...]}``: a stateless
  ``/reorder`` (``ContextPilot.schedule_only``), ``reordered[k]`` belongs to ``contexts[order[k]]``;
- ``{"op": "reset"}`` -> ``{}``: a fresh live index (stateful ``/reorder`` after ``/reset``);
- ``{"op": "online", "context": [doc, ...]}`` -> ``{"reordered": [...], "request_id": "..."}``: a stateful
  ``/reorder`` of one context (``ContextPilot.build_incremental``);
- ``{"op": "evict", "request_ids": [...]}`` -> ``{}``: ``/evict`` (``ContextPilot.remove_requests``).

Documents are small non-negative ints (ContextPilot packs them into int32 arrays).
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # ContextPilot prints banners on every call
    import logging

    logging.disable(logging.CRITICAL)
    from contextpilot.server.live_index import ContextPilot

    live = ContextPilot(alpha=0.001, use_gpu=False, linkage_method="average")
    anonymous = 0
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        op = request["op"]
        reply: dict[str, Any] = {}
        with contextlib.redirect_stdout(sys.stderr):
            if op == "batch":
                result = ContextPilot(alpha=0.001, use_gpu=False, linkage_method="average").schedule_only(
                    request["contexts"]
                )
                reply = {"reordered": result["reordered_contexts"], "order": result["original_indices"]}
            elif op == "reset":
                live = ContextPilot(alpha=0.001, use_gpu=False, linkage_method="average")
            elif op == "online":
                result = live.build_incremental([request["context"]])
                request_id = result["request_ids"][0] if result["request_ids"] else None
                if request_id is None:  # a context absorbed into an inner node gets no id
                    anonymous += 1
                    request_id = f"anonymous-{anonymous}"
                reply = {"reordered": list(result["reordered_contexts"][0]), "request_id": request_id}
            elif op == "evict":
                live.remove_requests(set(request["request_ids"]))
            else:
                raise ValueError(f"unknown op {op!r}")
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
