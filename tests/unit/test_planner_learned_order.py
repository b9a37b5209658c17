"""A group cut at boundaries learned from traffic (a LangChain stuff chain: documents joined by blank lines) whose
blocks the index has never seen goes out in the order sent: a later request of the same documents may not be cut
(and then goes out as the client sent it), so a canonical order of new blocks converges on nothing and costs the
prefix the client's own order (a retriever's ranking) would have hit; so does a group the engine holds none of.
New blocks found by their markup follow the client's first block, then the canonical order."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from gateway.metrics import Metrics
from gateway.planning.intercept import find_groups
from gateway.planning.intercept.boundaries import Boundaries
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from gateway.wire.chat import decode_request
from scheduler.blocks import block_id
from tests.unit.test_intercept_boundaries import A, B, D, prompt
from tests.unit.test_meaning_fixtures import run

C = "Sigma one.\n\nSigma two.\n\nSigma three."  # A sorts after C and D by block id


def _completion(text: str) -> bytes:
    return msgspec.json.encode({"model": "m", "prompt": text})


def _planner() -> Planner:
    return Planner(load_settings(environ={}), Residency(max_requests=1_000, stateless=False), Metrics())


def _sender(planner: Planner) -> Callable[[list[str], str], tuple[str, dict[str, object]]]:
    """Plan one request and have the engine accept it (what it was sent is now held): the prompt forwarded and the
    result header."""

    def send(chunks: list[str], question: str) -> tuple[str, dict[str, object]]:
        request = decode_request(_completion(prompt(chunks, question)), "/v1/completions")
        planned = planner.plan(planner.read(request, {}), f"req-{question}")
        planned.accept()
        request.update(planned.fields)
        return str(msgspec.json.decode(request.encode())["prompt"]), planned.result

    return send


def test_a_learned_group_of_new_blocks_goes_out_as_sent() -> None:
    """The boundaries were learned from traffic the block index never saw (another planner's: a restart that kept
    them, or another replica), so the blocks they cut are new to it."""
    boundaries = Boundaries()
    for warm in (prompt([A, B, C]), prompt([C, D, B, A], "other?")):
        boundaries.regroup(warm, find_groups(warm, "template", learn=True))
    planner = Planner(load_settings(environ={}), Residency(max_requests=1_000, stateless=False), Metrics(),
                      boundaries=boundaries)  # fmt: skip
    text = prompt([B, A, C, D])
    body, result = run(planner, "/v1/completions", _completion(text))
    assert result["groups"] == 1 and result["blocks"] == 4  # found: B, A, C and D, as the second request cut them
    assert result["reordered"] is False
    assert msgspec.json.decode(body)["prompt"] == text


def test_by_block_id_the_group_above_would_move() -> None:
    # after the client's first (B), A sorts last by block id: the test above fails where new blocks go by id
    assert block_id(A) > max(block_id(C), block_id(D))


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


def test_a_learned_group_takes_the_order_of_a_whole_prompt_the_engine_holds() -> None:
    """A stuff chain's documents cut at learned boundaries, which the block index never saw as blocks: the first
    request, sent whole (never cut), holds them in another order, so they go out in that order (the prefix index,
    by their bytes). Without such a prompt they go out as sent (the first test)."""
    send = _sender(_planner())
    a, b, c, d = (
        "\n\n".join(f"The {name} {part} says something of its own. " * 12 for part in ("opening", "closing"))
        for name in ("alpha", "beta", "gamma", "delta")
    )

    first, _ = send([c, d, b, a], "one?")
    assert first == prompt([c, d, b, a], "one?")  # the first request of a chunk is never cut: gone as sent
    second, result = send([b, a, c, d], "two?")
    assert result["groups"] == 1 and result["blocks"] == 2  # cut between b+a and c+d only
    assert second == prompt([c, d, b, a], "two?"), "the order the engine holds, each block whole"
    assert result["reordered"] is True and result["predicted_cached_blocks"] == 2


def test_a_short_block_that_opened_a_whole_prompt_the_engine_holds_goes_first() -> None:
    """As above with documents too short to end a chunk of the prefix index (``CHUNK_BYTES``): the prompt sent
    whole, never cut, opened with ``x``; a later request cut ``x`` apart from two others, and ``x`` goes first, told
    apart by the mark after it and its blank line (the chunk names alone cannot: none ends inside it)."""
    send = _sender(_planner())
    x, y, z, w, v = (
        f"The {name} note.\n\nIt says a little about {name}." for name in ("ex", "why", "zed", "dub", "vee")
    )

    assert send([x, y, z], "one?")[0] == prompt([x, y, z], "one?")
    send([y, w], "two?")
    send([z, v], "three?")
    out, result = send([w, x, v], "four?")
    assert result["groups"] == 1 and result["blocks"] == 3  # cut w | x | v: each was seen beside others
    assert out == prompt([x, w, v], "four?"), "x first: the prompt sent whole opened with it"
    assert result["reordered"] is True and result["predicted_cached_blocks"] == 1


def test_a_learned_group_the_engine_holds_nothing_of_goes_out_as_sent() -> None:
    """Blocks seen before, cut at confirmed boundaries, but none of them at the head of a prompt the engine holds: a
    canonical order would gain nothing now and cost what the client's own order (the retriever's ranking, which the
    next question tends to share) hits once this prompt is held. ``d`` was seen in more requests than ``b+c``: by
    popularity it would go first (and did, before)."""
    send = _sender(_planner())
    notes = {
        n: f"The {n} note says one thing.\n\nThe {n} note says another.\n\nThe {n} note ends here." for n in "abcdefg"
    }
    for i, chunks in enumerate((["a", "b", "c"], ["d", "a", "e"], ["f", "b", "g"])):
        send([notes[n] for n in chunks], f"warm {i}?")
    out, result = send([notes[n] for n in ("b", "c", "d")], "final?")
    assert result["groups"] == 1 and result["blocks"] == 2  # b+c (seen together only) and d
    assert result["predicted_cached_blocks"] == 0
    assert out == prompt([notes[n] for n in ("b", "c", "d")], "final?") and result["reordered"] is False
