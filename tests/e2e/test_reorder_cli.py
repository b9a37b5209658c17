"""``prefixgate reorder FILE``: a big batch in chunks against a live gateway, with progress and one contract."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.servers import serve_in_thread

pytestmark = pytest.mark.timeout(120)


def test_chunked_reorder_keeps_the_contract_and_shows_progress(tmp_path: Path) -> None:
    rng = random.Random(5)
    contexts = [[rng.randrange(60) for _ in range(rng.randint(3, 8))] for _ in range(1200)]
    conversations = [f"c{rng.randrange(150)}" if rng.random() < 0.7 else None for _ in contexts]
    source = tmp_path / "contexts.json"
    source.write_text(json.dumps({"contexts": contexts, "conversation_ids": conversations}))
    out = tmp_path / "out.json"
    with serve_in_thread(create_app(load_settings(environ={}, upstream="http://127.0.0.1:9"))) as base:
        run = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "reorder", str(source), "--url", base, "--chunk", "500",
             "--output", str(out)],
            capture_output=True, text=True, timeout=100, check=False,
        )  # fmt: skip
        live = json.loads(subprocess.run([sys.executable, "-c", f"import httpx; print(httpx.get('{base}/stats').text)"],
                                         capture_output=True, text=True, timeout=30, check=True).stdout)  # fmt: skip
    assert run.returncode == 0, run.stderr
    progress = [line for line in run.stderr.splitlines() if line.startswith("reorder:")]
    assert [line.split()[1] for line in progress] == ["500/1200", "1000/1200", "1200/1200"]
    result = json.loads(out.read_text())
    order = result["original_indices"]
    assert sorted(order) == list(range(len(contexts)))
    for position, index in enumerate(order):
        assert sorted(result["reordered_contexts"][position]) == sorted(contexts[index])
    assert len(set(result["request_ids"])) == len(contexts)
    assert result["scheduled_request_ids"] == [result["request_ids"][i] for i in order]
    assert live["index_stats"]["num_requests"] == len(contexts)
    turns: dict[str, list[int]] = {}
    for index in order:  # each conversation's turns run in input order, across chunks too
        if conversations[index] is not None:
            turns.setdefault(conversations[index], []).append(index)
    assert turns and all(indices == sorted(indices) for indices in turns.values())


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "bad.json"
    source.write_text('{"not": "contexts"}')
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "reorder", str(source), "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert "expected a JSON list of contexts" in run.stderr
    assert "Traceback" not in run.stderr
