"""A group cut at boundaries learned from traffic (a LangChain stuff chain: documents joined by blank lines) whose
blocks the index has never seen goes out in the order sent: a later request of the same documents may not be cut
(and then goes out as the client sent it), so a canonical order of new blocks converges on nothing and costs the
prefix the client's own order (a retriever's ranking) would have hit. New blocks found by their markup follow the
client's first block, then the canonical order."""

from __future__ import annotations

import msgspec

from gateway.metrics import Metrics
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from scheduler.blocks import block_id
from tests.unit.test_intercept_boundaries import A, B, D, prompt
from tests.unit.test_meaning_fixtures import run

C = "Sigma one.\n\nSigma two.\n\nSigma three."  # B+A sorts after C+D by block id


def _completion(text: str) -> bytes:
    return msgspec.json.encode({"model": "m", "prompt": text})


def _planner() -> Planner:
    return Planner(load_settings(environ={}), Residency(max_requests=1_000, stateless=False), Metrics())


def test_a_learned_group_of_new_blocks_goes_out_as_sent() -> None:
    planner = _planner()
    run(planner, "/v1/completions", _completion(prompt([A, B, C])))
    run(planner, "/v1/completions", _completion(prompt([C, D, B, A], "other?")))
    text = prompt([B, A, C, D])
    body, result = run(planner, "/v1/completions", _completion(text))
    assert result["groups"] == 1 and result["blocks"] == 2  # found: B+A and C+D, cut between them
    assert result["reordered"] is False
    assert msgspec.json.decode(body)["prompt"] == text


def test_by_block_id_the_group_above_would_move() -> None:
    assert block_id(f"{B}\n\n{A}") > block_id(f"{C}\n\n{D}")  # so the test above fails where new blocks go by id


def test_blocks_found_by_markup_still_take_the_canonical_order_after_the_clients_first() -> None:
    planner = _planner()
    docs = {n: f"<document>{n} " + "text " * 40 + "</document>" for n in ("x", "y", "z")}
    moved = 0
    for order in (("x", "y", "z"), ("x", "z", "y")):
        system = "Answer from the documents.\n<documents>\n" + "\n".join(docs[n] for n in order) + "\n</documents>"
        body = msgspec.json.encode({"model": "m", "messages": [{"role": "system", "content": system}]})
        out, result = run(planner, "/v1/chat/completions", body)
        assert result["groups"] == 1
        content = msgspec.json.decode(out)["messages"][0]["content"]
        assert content.index(docs["x"]) < min(content.index(docs["y"]), content.index(docs["z"]))
        moved += bool(result["reordered"])
    assert moved == 1  # x, the client's first, stays first; y and z converge on one order: one of the two moves
