"""llama.cpp slot choice: pin the slot holding the longest prefix of the whole prompt, else leave it to llama.cpp
(no ``id_slot``) and record where llama.cpp's own rule puts the request."""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from engines.llamacpp.slots import SlotTable
from gateway.metrics import Metrics
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from gateway.wire.chat import CHAT_ROUTE, decode_request
from scheduler.prefixes import CHUNK_BYTES, Chain


def chain(text: str) -> tuple[int, ...]:
    c = Chain()
    c.update(text.encode())
    return c.freeze()


PROMPT = "x" * (20 * CHUNK_BYTES)


def test_nothing_held_leaves_the_choice_to_llama_cpp_and_guesses_its_lru_slot() -> None:
    table = SlotTable.of(2)
    assert table.choose(chain(PROMPT)) is None
    assert table.guess(chain(PROMPT)) == 1, "llama.cpp scans for the least recently used slot with <=: the last"
    table.reserve(1)
    table.occupy(1, "r1", chain(PROMPT), known=False)
    table.finish(1)
    assert table.guess(chain("y" * 4 * CHUNK_BYTES)) == 0


def test_the_slot_holding_the_longest_prefix_is_pinned() -> None:
    table = SlotTable.of(3)
    table.occupy(0, "short", chain(PROMPT[: 3 * CHUNK_BYTES]))
    table.occupy(2, "long", chain(PROMPT[: 12 * CHUNK_BYTES] + "z" * CHUNK_BYTES))
    assert table.choose(chain(PROMPT)) == 2
    assert table.held(chain(PROMPT)) == 12
    table.reserve(2)  # busy: llama.cpp never waits for a busy slot itself, nor does the choice
    assert table.choose(chain(PROMPT)) == 0
    table.reserve(0)
    table.reserve(1)  # every slot busy: the longest prefix again
    assert table.choose(chain(PROMPT)) == 2


def test_a_guessed_slot_is_pinned_only_where_llama_cpps_similarity_would_miss_it() -> None:
    table = SlotTable.of(2)
    table.occupy(1, "guessed", chain(PROMPT), known=False)
    assert table.choose(chain(PROMPT + "more")) is None, "most of the prompt: llama.cpp finds it by itself"
    small = chain(PROMPT[:CHUNK_BYTES] + "q" * 30 * CHUNK_BYTES)
    assert table.choose(small) == 1, "one chunk of 31: below llama.cpp's threshold, so the gateway pins it"
    table.occupy(1, "known", chain(PROMPT))
    assert table.choose(chain(PROMPT + "more")) == 1
    table.clear()
    assert table.choose(chain(PROMPT)) is None


def _planner() -> Planner:
    planner = Planner(load_settings(environ={}), Residency(max_requests=100, stateless=False), Metrics())
    planner.use_slots(2)
    return planner


def _send(planner: Planner, body: dict[str, Any], request_id: str) -> Any:
    planned = planner.plan(planner.read(decode_request(msgspec.json.encode(body), CHAT_ROUTE), {}), request_id)
    planned.accept()
    planned.finish()
    return planned


def test_a_block_free_prompt_sent_twice_goes_back_to_its_slot() -> None:
    planner = _planner()
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me about " + "pumpkins " * 400}]}
    first = _send(planner, body, "r1")
    assert "id_slot" not in first.fields and first.result["slot_guessed"] is True
    _send(planner, {"model": "m", "messages": [{"role": "user", "content": "other " * 400}]}, "r2")
    second = _send(planner, body, "r3")
    assert second.slot == first.slot, "the guessed slot still holds it"
    assert "id_slot" not in second.fields, "most of the prompt is held: llama.cpp's similarity finds it"


def test_a_chats_second_turn_is_pinned_to_the_slot_that_ran_the_first() -> None:
    planner = _planner()
    turn1 = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "hello " * 60}]
    first = planner.plan(planner.read(decode_request(msgspec.json.encode({"messages": turn1}), CHAT_ROUTE), {}), "t1")
    planner.residency.slots.occupy(first.slot, "t1", first.chain)  # type: ignore[union-attr]  # as pinned
    first.finish()
    turn2 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more " * 2000}]
    second = planner.plan(planner.read(decode_request(msgspec.json.encode({"messages": turn2}), CHAT_ROUTE), {}), "t2")
    assert second.fields["id_slot"] == first.slot, "a known slot holding the first turn: pinned"
    assert planner.residency.held_chars(second.chain) >= len("You are terse. " * 40) - CHUNK_BYTES


def test_with_its_prompt_cache_a_rewrite_that_only_a_prompt_out_of_the_slots_pays_for_overwrites_it() -> None:
    residency = Residency(max_requests=100, stateless=False)
    assert not residency.overwrites(chain(PROMPT), 10 * CHUNK_BYTES, 0), "no slots known: nothing to tell"
    residency.in_slots = deque(maxlen=2)
    held_in_ram = "r" * (8 * CHUNK_BYTES)
    residency.sent(chain(held_in_ram + "one" * CHUNK_BYTES))
    residency.sent(chain("s" * (4 * CHUNK_BYTES)))
    residency.sent(chain("t" * (4 * CHUNK_BYTES)))  # two prompts since: no slot holds the first one any more
    rewrite = chain(held_in_ram + "two" * CHUNK_BYTES)
    held = residency.held_chars(rewrite)
    assert held == 8 * CHUNK_BYTES and residency.overwrites(rewrite, held, 0)
    assert not residency.overwrites(rewrite, held, held), "the prompt as sent reaches as far: nothing to trade"
    assert not residency.overwrites(chain(held_in_ram + "one" * CHUNK_BYTES), 11 * CHUNK_BYTES, 0), "sent again"
    residency.sent(chain(held_in_ram + "one" * CHUNK_BYTES))  # back in a slot: a request keeps a copy
    assert not residency.overwrites(rewrite, held, 0)
    residency.reset()
    assert not residency.in_slots and not residency.overwrites(rewrite, residency.held_chars(rewrite), 0)
