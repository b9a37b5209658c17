"""A group cut at boundaries learned from traffic (a LangChain stuff chain: documents joined by blank lines) whose
blocks the index knows nothing to order by goes out longest first, and blocks of one length in the order sent: a
later request of the same documents may not be cut (and then goes out as the client sent it), so where nothing
tells which block a later request shares, the longest first pays back the most, and the client's own order (a
retriever's ranking) decides the rest. New blocks found by their markup go longest first too, then the client's
first block, then the canonical order."""

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


def _planner(*, reuse_overwrites: bool = False) -> Planner:
    residency = Residency(max_requests=1_000, stateless=False)
    residency.reuse_overwrites = reuse_overwrites
    return Planner(load_settings(environ={}), residency, Metrics())


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


def _learned(chunks: list[str]) -> Planner:
    """A planner whose boundaries were learned from traffic the block index never saw (another planner's: a restart
    that kept them, or another replica), so the blocks they cut are new to it."""
    boundaries = Boundaries()
    a, b, c, d = chunks
    for warm in (prompt([a, b, c]), prompt([c, d, b, a], "other?")):
        boundaries.regroup(warm, find_groups(warm, "template", learn=True))
    return Planner(load_settings(environ={}), Residency(max_requests=1_000, stateless=False), Metrics(),
                   boundaries=boundaries)  # fmt: skip


def test_a_learned_group_of_new_blocks_goes_out_longest_first() -> None:
    planner = _learned([A, B, C, D])
    text = prompt([B, A, C, D])
    body, result = run(planner, "/v1/completions", _completion(text))
    assert result["groups"] == 1 and result["blocks"] == 4  # found: B, A, C and D, as the second request cut them
    assert len(C) > len(A) == len(D) > len(B)
    assert msgspec.json.decode(body)["prompt"] == prompt([C, A, D, B])  # A and D, of one length, as sent
    assert result["reordered"] is True


def test_a_learned_group_of_new_blocks_of_one_length_goes_out_as_sent() -> None:
    same = [f"{name} one.\n\n{name} two." for name in ("Kappa", "Lamda", "Omega", "Theta")]
    planner = _learned(same)
    a, b, c, d = same
    text = prompt([a, d, c, b])  # no two side by side as the warm requests showed them
    body, result = run(planner, "/v1/completions", _completion(text))
    assert result["groups"] == 1 and result["blocks"] == 4
    assert msgspec.json.decode(body)["prompt"] == text and result["reordered"] is False
    # by block id they would move: after the client's first, the canonical order is not the order sent
    ids = [block_id(chunk) for chunk in (d, c, b)]
    assert ids != sorted(ids)


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


def _held_nothing_of(planner: Planner) -> tuple[str, dict[str, object], dict[str, str]]:
    """Blocks cut at confirmed boundaries, none of them at the head of a prompt the engine holds, each seen in one
    request before; the client sends the shorter first."""
    send = _sender(planner)
    notes = {n: f"The {n} note says one thing.\n\nThe {n} note says another." for n in "abcdefg"}
    notes["d"] += "\n\nThe d note ends here, at some length."
    for i, chunks in enumerate((["a", "b", "c"], ["e", "d", "f"], ["g", "b", "a"], ["c", "f", "e"])):
        send([notes[n] for n in chunks], f"warm {i}?")
    out, result = send([notes[n] for n in ("b", "d")], "final?")
    assert result["groups"] == 1 and result["blocks"] == 2
    assert result["predicted_cached_blocks"] == 0
    return out, result, notes


def test_a_learned_group_the_engine_holds_nothing_of_goes_out_longest_first() -> None:
    out, result, notes = _held_nothing_of(_planner())
    assert out == prompt([notes["d"], notes["b"]], "final?") and result["reordered"] is True


def test_on_an_engine_whose_reuse_overwrites_it_goes_out_as_sent_where_the_gateway_pins_its_slots() -> None:
    """llama.cpp holds a prompt once: a request that keeps a quarter of one it keeps in host RAM takes it out of
    there and overwrites the rest, so a move that gains nothing now can cost a prompt that is asked again. With
    slots the gateway pins it does not follow which prompts llama.cpp keeps in host RAM: the group goes as sent.
    Left to llama.cpp's own slot choice, the gateway follows the prompts its slots hold, and the whole rewrite goes
    as sent only where it would take a prompt out of the host-RAM cache (the test below): the group goes longest
    first."""
    pinned = _planner(reuse_overwrites=True)
    pinned.use_slots(2, pin=True)
    out, result, notes = _held_nothing_of(pinned)
    assert out == prompt([notes["b"], notes["d"]], "final?") and result["reordered"] is False
    left_to_llama = _planner(reuse_overwrites=True)
    left_to_llama.use_slots(2, pin=False)
    out, result, notes = _held_nothing_of(left_to_llama)
    assert out == prompt([notes["d"], notes["b"]], "final?") and result["reordered"] is True
    assert "left_alone" not in result


def test_on_llama_cpp_a_move_that_only_a_prompt_out_of_its_slots_pays_for_goes_out_as_sent() -> None:
    """llama.cpp left to its own slot choice (its host-RAM prompt cache) keeps each prompt once: a request that
    shares the head of a prompt kept only in that cache takes the prompt out of it and overwrites the rest. So a
    move whose gain is the head of a prompt no slot holds any more (two slots, two prompts sent since) goes out as
    sent, and says why; with three slots, or on an engine whose reuse keeps a copy, it moves."""
    a, b, c, d, e, f = (
        "\n\n".join(f"The {name} {part} says something of its own. " * 12 for part in ("opening", "closing"))
        for name in ("alpha", "beta", "gamma", "delta", "eps", "phi")
    )
    other = decode_request(_completion("Something else entirely. " * 40), "/v1/completions")
    for slots, reuse_overwrites, moved in ((2, True, False), (3, True, True), (2, False, True)):
        planner = _planner(reuse_overwrites=reuse_overwrites)
        planner.use_slots(slots, pin=False)
        send = _sender(planner)
        send([c, d, b, a], "one?")
        send([b, a, e, f], "two?")
        planner.plan(planner.read(other, {}), "other").accept()
        out, result = send([e, f, c, d], "three?")  # c and d opened the first prompt, which went on otherwise
        assert result["groups"] == 1 and result["blocks"] == 2
        if moved:
            assert out == prompt([c, d, e, f], "three?") and result["reordered"] is True
            assert result["predicted_cached_blocks"] == 1 and "left_alone" not in result
        else:
            assert out == prompt([e, f, c, d], "three?") and result["reordered"] is False
            assert result["left_alone"] == {"would_overwrite_cached": 1}
            assert result["predicted_cached_tokens"] == 0
