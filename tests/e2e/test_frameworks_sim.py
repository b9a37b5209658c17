"""LangChain's RetrievalQA, unchanged, pointed at the gateway: the engine reports the documents as cached.

Real sockets, the real ``langchain-openai`` client, the built-in simulated engine. The documents carry no
marker and hold blank lines, so the gateway learns their boundaries from the warm-up traffic first.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from engines.sim import SimConfig
from tests.e2e.test_gateway_sim import _stack
from tests.frameworks import quiet
from tests.integration.test_frameworks import DOCS, FIRST, SECOND

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, str]]:
    yield from _stack(SimConfig(prefill_us_per_token=0.5, decode_us_per_token=100.0))


def cached_tokens(base: str, contexts: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """Run RetrievalQA once per context against ``base``; return (prompt tokens, cached tokens) of each call."""
    from langchain_classic.chains import RetrievalQA
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_openai import ChatOpenAI

    current: list[str] = []
    usage: list[tuple[int, int]] = []

    class Retriever(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any = None) -> list[Document]:
            return [Document(page_content=text) for text in current]

    class Usage(BaseCallbackHandler):
        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            meta = response.generations[0][0].message.usage_metadata
            usage.append((meta["input_tokens"], meta.get("input_token_details", {}).get("cache_read", 0)))

    llm = ChatOpenAI(model="sim", base_url=f"{base}/v1", api_key="unused", max_tokens=2, callbacks=[Usage()])  # type: ignore[arg-type]
    with quiet():
        chain = RetrievalQA.from_chain_type(llm=llm, retriever=Retriever())
        for i, docs in enumerate(contexts):
            current[:] = docs
            chain.invoke({"query": f"question {i}?"})
    return usage


def test_retrieval_qa_gets_the_documents_cached_through_the_gateway(stack: tuple[str, str]) -> None:
    import httpx

    gateway, engine = stack
    rng = random.Random(5)
    # twenty warm-ups, as in the integration test: a boundary is cut once seen apart more often than together
    contexts = [rng.sample(DOCS, 3) for _ in range(20)] + [FIRST, SECOND]
    through = cached_tokens(gateway, contexts)
    httpx.post(f"{engine}/sim/reset").raise_for_status()
    direct = cached_tokens(engine, contexts)
    prompt, hit = through[-1]
    assert hit >= 0.8 * prompt  # the four documents in the order the previous request left in the cache
    # direct access: the template's opening words and whatever documents happen to lead in the same order
    assert hit - direct[-1][1] >= 0.4 * prompt


CUSTOM_SYSTEM = "You are the help desk of ACME. Ground every answer in the excerpts below.\n\n{context}"
CUSTOM_USER = "Excerpts:\n\n{context}\n\nUsing only the excerpts above, answer this: {question}"


def lcel_cached_tokens(base: str, template: str, contexts: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """Run an LCEL chain with an application's own prompt (no framework ships it) once per context."""
    from langchain_core.documents import Document
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnablePassthrough
    from langchain_openai import ChatOpenAI

    current: list[str] = []

    class Retriever(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any = None) -> list[Document]:
            return [Document(page_content=text) for text in current]

    def join(docs: Sequence[Document]) -> str:
        return "\n\n".join(doc.page_content for doc in docs)

    messages = [("human", template)] if "{question}" in template else [("system", template), ("human", "{question}")]
    llm = ChatOpenAI(model="sim", base_url=f"{base}/v1", api_key="unused", max_tokens=2)  # type: ignore[arg-type]
    chain = (
        {"context": Retriever() | join, "question": RunnablePassthrough()}
        | ChatPromptTemplate.from_messages(messages)
        | llm
    )
    usage = []
    with quiet():
        for i, docs in enumerate(contexts):
            current[:] = docs
            meta = chain.invoke(f"question {i}?").usage_metadata
            usage.append((meta["input_tokens"], meta.get("input_token_details", {}).get("cache_read", 0)))
    return usage


@pytest.mark.parametrize("template", [CUSTOM_SYSTEM, CUSTOM_USER], ids=["system", "user"])
def test_an_applications_own_template_is_learned_and_its_documents_cached(
    stack: tuple[str, str], template: str
) -> None:
    """No detector knows these prompts: the gateway learns where the documents are from the warm-up traffic, moves
    only whole documents (audited on what the engine received) and never the question."""
    import httpx

    from gateway.planning.intercept import audit_rewrite

    gateway, engine = stack
    rng = random.Random(5)
    contexts = [rng.sample(DOCS, 3) for _ in range(20)] + [FIRST, SECOND]
    httpx.post(f"{engine}/sim/reset").raise_for_status()
    through = lcel_cached_tokens(gateway, template, contexts)
    received = httpx.get(f"{engine}/sim/requests").json()[-len(contexts) :]
    role = "user" if "{question}" in template else "system"
    moved = 0
    for i, (docs, record) in enumerate(zip(contexts, received, strict=True)):
        (forwarded,) = [m["content"] for m in record["body"]["messages"] if m["role"] == role]
        sent = template.format(context="\n\n".join(docs), question=f"question {i}?")
        moved += audit_rewrite(sent, forwarded, docs).moved
    assert moved >= 1
    httpx.post(f"{engine}/sim/reset").raise_for_status()
    direct = lcel_cached_tokens(engine, template, contexts)
    prompt, hit = through[-1]
    assert hit - direct[-1][1] >= 0.3 * prompt, (through[-1], direct[-1])


def test_a_text_splitters_overlapping_windows_go_out_whole(stack: tuple[str, str]) -> None:
    """LangChain's ``RecursiveCharacterTextSplitter`` with an overlap (``chunk_overlap=180``) cuts a guide of short
    paragraphs into windows that each open with the previous window's last two paragraphs. Retrieved in varied
    combinations and sent through the gateway by an LCEL chain with the v0.3 tutorial's system prompt, every
    forwarded prompt holds each window whole (audited on what the engine received), and some are reordered."""
    import httpx
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    from gateway.planning.intercept import audit_rewrite
    from tests.frameworks import TUTORIAL_V03_SYSTEM

    gateway, engine = stack
    guide = "\n\n".join(
        f"To tune the cache, the guide sets option {i} and then restarts the engine." for i in range(40)
    )
    splitter = RecursiveCharacterTextSplitter(chunk_size=480, chunk_overlap=180, separators=["\n\n"])
    windows = splitter.split_text(guide)
    heads = [window.split("\n\n")[:2] for window in windows[1:]]
    assert all(head == window.split("\n\n")[-2:] for head, window in zip(heads, windows, strict=False))  # overlap 2
    rng = random.Random(0)  # before windows were told apart from chunks, 5 of 6 seeds sent one split and moved
    contexts = [rng.sample(windows, rng.randint(2, 4)) for _ in range(40)]
    httpx.post(f"{engine}/sim/reset").raise_for_status()
    lcel_cached_tokens(gateway, TUTORIAL_V03_SYSTEM, contexts)
    received = httpx.get(f"{engine}/sim/requests").json()[-len(contexts) :]
    moved = 0
    for docs, record in zip(contexts, received, strict=True):
        (forwarded,) = [m["content"] for m in record["body"]["messages"] if m["role"] == "system"]
        moved += audit_rewrite(TUTORIAL_V03_SYSTEM.format(context="\n\n".join(docs)), forwarded, docs).moved
    assert moved >= 1
