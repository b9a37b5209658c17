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
