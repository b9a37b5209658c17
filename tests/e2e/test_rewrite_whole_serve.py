"""A block moves whole, and only a block: the issue's three mangling reproductions against a real
``prefixgate serve`` process and its simulated engine, which records the text it received.

Each forwarded text is audited against the text sent and the documents the application put in it
(:func:`gateway.planning.intercept.audit.audit_rewrite`): the same documents, each byte-identical, permuted,
with the template's bytes in place.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from gateway.planning.intercept.audit import audit_rewrite
from tests.e2e.servers import free_port, gateway_process
from tests.frameworks import HAYSTACK_TUTORIAL, quiet

pytestmark = pytest.mark.timeout(120)

QA = (
    "Use the following pieces of context to answer the question at the end. If you don't know the answer, "
    "just say that you don't know, don't try to make up an answer.\n\n"
)


class Gateway:
    def __init__(self, base: str, engine: str) -> None:
        self.base, self.engine = base, engine
        self.client = httpx.Client(base_url=base, timeout=30)

    def send(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Send a chat body; return the result header and the last message's text as the engine received it."""
        response = self.client.post("/v1/chat/completions", json={"model": "sim", "max_tokens": 1, **body})
        assert response.status_code == 200, response.text
        (seen,) = httpx.get(f"{self.engine}/sim/requests?limit=1").json()
        return httpx.Response(200, text=response.headers["x-prefixgate-result"]).json(), _text(seen["body"])


def _text(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    assert isinstance(content, str)
    return content


@contextmanager
def serve(*args: str) -> Iterator[Gateway]:
    sim_port = free_port()
    with gateway_process("--sim-port", str(sim_port), *args, stderr=subprocess.DEVNULL) as base:
        gateway = Gateway(base, f"http://127.0.0.1:{sim_port}")
        with gateway.client:
            yield gateway


def _user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def _numbered(docs: Sequence[str], question: str) -> str:
    sources = "\n".join(f"[{i}] {doc}" for i, doc in enumerate(docs, 1))
    return f"Answer from the sources below.\n\nSources:\n{sources}\n\nQuestion: {question}"


DUMPS = "json.dumps(obj) serializes obj to a JSON formatted str using this conversion table."
LOADS = "json.loads(s) deserializes s (a str, bytes or bytearray instance) to a Python object."
DUMP = "json.dump(obj, fp) serializes obj as a JSON formatted stream to fp, for example:\n\n    json.dump(data, fp)"
DUMPS2 = "json.dumps(obj)\nserializes obj to a JSON formatted str\nusing this conversion table."
LOADS2 = "json.loads(s)\ndeserializes s (a str, bytes or bytearray)\nto a Python object."
HEADING = "JSON encoder and decoder\n========================\njson exposes an API familiar to users of pickle."


@pytest.mark.parametrize("docs", [[DUMPS, LOADS, DUMP], [DUMPS2, LOADS2, HEADING]], ids=["code", "underline"])
def test_numbered_sources_keep_a_trailing_code_block_and_an_underline_with_their_source(docs: list[str]) -> None:
    """Fails on the old code: the last source's indented code block (and the underline under its heading)
    stayed at the end of the list, under another source's number, once the sources were reordered."""
    moved = 0
    with serve() as gateway:
        for _ in range(2):
            for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
                picked = [docs[i] for i in order]
                sent = _numbered(picked, "How do I write JSON to a file?")
                _, forwarded = gateway.send(_user(sent))
                moved += audit_rewrite(sent, forwarded, picked, labels="positional").moved
    assert moved  # not vacuous: sources were reordered


def _haystack(docs: Sequence[str], question: str) -> str:
    from haystack import Document
    from haystack.components.builders import PromptBuilder

    builder = PromptBuilder(template=HAYSTACK_TUTORIAL, required_variables=["documents", "query"])
    prompt: str = builder.run(documents=[Document(content=text) for text in docs], query=question)["prompt"]
    return prompt


HAYSTACK_DOCS = [
    "The json module encodes and decodes JSON, a lightweight data interchange format.",
    "json.dump writes a JSON document to a file object; json.dumps returns it as a string.",
    "json.load reads a JSON document from a file object; json.loads parses one from a string.",
    "JSONDecodeError is raised when the text being decoded is not valid JSON.",
    "The sort_keys argument makes the output of dictionaries sorted by key.",
    "The indent argument pretty-prints arrays and objects with that many spaces per level.",
]


def test_haystack_tutorial_documents_keep_the_templates_indentation() -> None:
    """Fails on the old code: a moved document came out indented by eight spaces and the displaced one by none."""
    rng = random.Random(2)
    with quiet(), serve() as gateway:
        moved = 0
        for i in range(30):
            picked = rng.sample(HAYSTACK_DOCS, 4)
            sent = _haystack(picked, f"question {i}?")
            result, forwarded = gateway.send(_user(sent))
            moved += audit_rewrite(sent, forwarded, picked).moved
            assert result["reordered"] == (forwarded != sent)
        assert moved >= 5  # not vacuous: the gateway did reorder these documents


def _qa(chunks: Sequence[str], question: str) -> str:
    context = "\n\n".join(chunks)
    return f"{QA}{context}\n\nQuestion: {question}\nHelpful Answer:"


VICTIM_A = "The victim's document opens with this paragraph about json.dump."
VICTIM_B = "Its second paragraph explains the fp argument of json.dump."
OTHERS = [f"Unrelated chunk number {n} about the pickle module and its protocols." for n in range(4)]


@pytest.mark.parametrize("args", [(), ("--api-key", "victim", "--api-key", "attacker", "--shared-cache")])
def test_two_requests_cannot_split_a_chunk_another_client_sent_whole(args: tuple[str, ...]) -> None:
    """The issue's attack. Fails on the old code: after the victim's traffic showed ``a\\n\\nb`` whole, the
    attacker's ``[a, x]`` and ``[y, b]`` made the victim's next request go out as ``... b ... a``."""
    victim_doc = f"{VICTIM_A}\n\n{VICTIM_B}"
    with serve(*args) as gateway:
        keys = {"victim": {"Authorization": "Bearer victim"}, "attacker": {"Authorization": "Bearer attacker"}}
        as_victim = keys["victim"] if args else {}
        as_attacker = keys["attacker"] if args else {}
        gateway.client.headers.update(as_victim)
        rng = random.Random(4)
        for i in range(12):  # the victim's own traffic: its chunks in varied orders, its document whole
            picked = [victim_doc, *rng.sample(OTHERS, 2)]
            rng.shuffle(picked)
            gateway.send(_user(_qa(picked, f"victim {i}?")))
        gateway.client.headers.update(as_attacker)
        gateway.send(_user(_qa([VICTIM_A, "Attacker chunk x."], "x?")))
        gateway.send(_user(_qa(["Attacker chunk y.", VICTIM_B], "y?")))
        gateway.client.headers.update(as_victim)
        moved = 0
        for i in range(6):
            picked = [*rng.sample(OTHERS, 2), victim_doc]
            rng.shuffle(picked)
            sent = _qa(picked, f"victim again {i}?")
            _, forwarded = gateway.send(_user(sent))
            moved += audit_rewrite(sent, forwarded, picked).moved
        assert moved  # not vacuous: the victim's chunks were reordered, its document whole
