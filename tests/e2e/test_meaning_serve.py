"""A real ``prefixgate serve`` with its simulated engine: the seed's online flow keeps its ids, a referenced
source keeps its label, and /metrics and the access log show what happened."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import httpx
import pytest

from tests.e2e.servers import free_port, wait_healthy

pytestmark = pytest.mark.timeout(90)

DOCS = [
    "Sagrada Familia in Barcelona, designed by Antoni Gaudi, has been under construction since 1882.",
    "Big Ben is the nickname of the Great Bell of the clock at the north end of Westminster Palace.",
    "The Colosseum in Rome is an oval amphitheatre that could hold between 50,000 and 80,000 people.",
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair and is 330 metres tall.",
]
SOURCES = "Answer from the sources.\n\nSources:\n" + "\n".join(f"[{i}] {doc}" for i, doc in enumerate(DOCS, 1))


def test_online_flow_ids_meaning_metrics_and_access_log() -> None:
    port, sim_port = free_port(), free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--sim-port", str(sim_port)]
    process = subprocess.Popen(
        [*command, "--engine", "sglang", "--access-log", "--log-level", "info"], stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/health")
        with httpx.Client(base_url=base, timeout=30) as client:
            contexts = [["Transformers use self-attention", "BERT is bidirectional"], ["RNNs", "LSTMs use gating"]]
            request_ids = client.post("/reorder", json={"contexts": contexts}).json()["request_ids"]
            step2 = {"model": "sim", "prompt": "What is machine learning?", "max_tokens": 3, "rid": request_ids[0]}
            answer = client.post("/v1/completions", json=step2)
            assert answer.status_code == 200
            assert answer.headers["x-request-id"] == request_ids[0]
            assert answer.json()["id"] == "cmpl-" + request_ids[0]  # the engine ran it under that rid
            question = {"role": "user", "content": "What does source [3] say?"}
            chat = {"model": "sim", "max_tokens": 2, "messages": [{"role": "system", "content": SOURCES}, question]}
            referenced = client.post("/v1/chat/completions", json=chat)
            assert json.loads(referenced.headers["x-prefixgate-result"])["kept_labels"] == {"referenced": 1}
            metrics = client.get("/metrics").text
        assert 'prefixgate_groups_found_total{format="numbered"} 1.0' in metrics
        assert 'prefixgate_blocks_found_total{format="numbered"} 4.0' in metrics
        assert 'decision="keep_labels",format="numbered",reason="referenced"} 1.0' in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if "prefixgate.access" in line]
    assert any(re.search(rf"id={request_ids[0]} route=/v1/completions status=200 groups=0 ", line) for line in lines)
    # labels kept, and moving them would win nothing the index knows of: left in place
    assert any("route=/v1/chat/completions status=200 groups=1 reordered=false" in line for line in lines)
