"""Requests as the real RAG frameworks send them: their default prompts rendered by the libraries themselves.

Each ``render_*`` function takes documents (texts, in retrieval order), runs the library's own chain, prompt
or synthesizer, and returns the OpenAI request body it would send: LangChain through ``langchain-openai``'s
``ChatOpenAI``/``OpenAI`` with an httpx transport that captures the request instead of sending it; LlamaIndex
through a chat model that records the messages its synthesizer built; Haystack through ``PromptBuilder``.

Two prompts come from LangChain's prompt hub (``rlm/rag-prompt``, ``langchain-ai/retrieval-qa-chat``) and two
from LangChain's tutorials (the v0.3 RAG system prompt, the v1 agent's ``Source:/Content:`` tool); the hub and
the tutorials are not in the packages, so their wording is written out here and rendered by the library.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx

__all__ = ["CASES", "Case", "quiet"]

_CHAT_REPLY = {
    "id": "c",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
_TEXT_REPLY = {
    "id": "c",
    "object": "text_completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}

# https://smith.langchain.com/hub/rlm/rag-prompt (human message)
HUB_RAG_PROMPT = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to answer "
    "the question. If you don't know the answer, just say that you don't know. Use three sentences maximum and "
    "keep the answer concise.\nQuestion: {question} \nContext: {context} \nAnswer:"
)
# https://smith.langchain.com/hub/langchain-ai/retrieval-qa-chat (system message)
HUB_RETRIEVAL_QA_CHAT = (
    "Answer any use questions based solely on the context below:\n\n<context>\n{context}\n</context>"
)
# python.langchain.com v0.3 RAG tutorial, create_retrieval_chain section
TUTORIAL_V03_SYSTEM = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to answer "
    "the question. If you don't know the answer, say that you don't know. Use three sentences maximum and keep the "
    "answer concise.\n\n{context}"
)
# python.langchain.com v0.2/v0.3 conversational RAG tutorial (create_history_aware_retriever): the QA system prompt
CONVERSATIONAL_SYSTEM = "Answer the user's questions based on the below context:\n\n{context}"
# docs.langchain.com v1 RAG tutorial: the RAG chain's dynamic system prompt
TUTORIAL_V1_SYSTEM = "You are a helpful assistant. Use the following context in your response:\n\n{context}"


@contextmanager
def quiet() -> Iterator[None]:
    """The frameworks' own deprecation notices (RetrievalQA) are not ours to fail on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        try:
            from langchain_core._api.deprecation import LangChainDeprecationWarning
        except ImportError:  # pragma: no cover
            pass
        else:
            warnings.simplefilter("ignore", LangChainDeprecationWarning)
        yield


class _Capture:
    """An httpx client whose transport records each request body and answers like an OpenAI server."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.client = httpx.Client(transport=httpx.MockTransport(self._handle))

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        reply = _CHAT_REPLY if request.url.path.endswith("/chat/completions") else _TEXT_REPLY
        return httpx.Response(200, json=reply)


def _chat_model(capture: _Capture) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="m", api_key="k", base_url="http://capture/v1", http_client=capture.client)  # type: ignore[arg-type]


def _retriever(docs: Sequence[str]) -> Any:
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any = None) -> list[Document]:
            return [Document(page_content=text) for text in docs]

    return Fixed()


def lc_retrieval_qa_chat(docs: Sequence[str], question: str) -> dict[str, Any]:
    """``RetrievalQA.from_chain_type`` with a chat model: the stuff chain's ``CHAT_PROMPT``."""
    from langchain_classic.chains import RetrievalQA

    capture = _Capture()
    RetrievalQA.from_chain_type(llm=_chat_model(capture), retriever=_retriever(docs)).invoke({"query": question})
    return capture.bodies[-1]


def lc_retrieval_qa(docs: Sequence[str], question: str) -> dict[str, Any]:
    """``RetrievalQA.from_chain_type`` with a completion model: ``PROMPT`` on ``/v1/completions``."""
    from langchain_classic.chains import RetrievalQA
    from langchain_openai import OpenAI

    capture = _Capture()
    llm = OpenAI(model="m", api_key="k", base_url="http://capture/v1", http_client=capture.client)  # type: ignore[arg-type]
    RetrievalQA.from_chain_type(llm=llm, retriever=_retriever(docs)).invoke({"query": question})
    return capture.bodies[-1]


def _retrieval_chain(messages: list[tuple[str, str]], key: str) -> Callable[[Sequence[str], str], dict[str, Any]]:
    def render(docs: Sequence[str], question: str) -> dict[str, Any]:
        from langchain_classic.chains import create_retrieval_chain
        from langchain_classic.chains.combine_documents import create_stuff_documents_chain
        from langchain_core.prompts import ChatPromptTemplate

        capture = _Capture()
        prompt = ChatPromptTemplate.from_messages(messages)
        if key == "question":  # rag-prompt names its variables context/question: a plain stuff chain
            chain = create_stuff_documents_chain(_chat_model(capture), prompt)
            from langchain_core.documents import Document

            chain.invoke({"context": [Document(page_content=text) for text in docs], "question": question})
        else:
            combine = create_stuff_documents_chain(_chat_model(capture), prompt)
            create_retrieval_chain(_retriever(docs), combine).invoke({"input": question})
        return capture.bodies[-1]

    return render


def lc_agent_tool(docs: Sequence[str], question: str) -> dict[str, Any]:
    """The v1 RAG agent tutorial's tool, run by langchain-core; the next model call carries its result."""
    from langchain_core.documents import Document
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_core.tools import tool

    found = [Document(page_content=text, metadata={"source": f"https://example.org/kb/{i}"}) for i, text in
             enumerate(sorted(docs))]  # fmt: skip
    by_text = {doc.page_content: doc for doc in found}

    @tool(response_format="content_and_artifact")
    def retrieve_context(query: str) -> tuple[str, list[Any]]:
        """Retrieve information to help answer a query."""
        retrieved = [by_text[text] for text in docs]
        serialized = "\n\n".join(f"Source: {doc.metadata}\nContent: {doc.page_content}" for doc in retrieved)
        return serialized, retrieved

    call = {"name": "retrieve_context", "args": {"query": question}, "id": "call_1", "type": "tool_call"}
    result = retrieve_context.invoke(call)
    capture = _Capture()
    system = "You have access to a tool that retrieves context from a blog post. Use the tool to help answer."
    _chat_model(capture).invoke(
        [SystemMessage(system), HumanMessage(question), AIMessage("", tool_calls=[call]), result]
    )
    return capture.bodies[-1]


def _llama_llm(context_window: int) -> Any:
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        CompletionResponse,
        LLMMetadata,
    )
    from llama_index.core.llms import CustomLLM

    class Recording(CustomLLM):
        """A chat model that records what the synthesizer sends it."""

        sent: list[list[dict[str, Any]]] = []  # noqa: RUF012

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(context_window=context_window, num_output=16, is_chat_model=True, model_name="m")

        def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
            self.sent.append([{"role": m.role.value, "content": m.content} for m in messages])
            return ChatResponse(message=ChatMessage(role="assistant", content="ok"))

        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
            self.sent.append([{"role": "user", "content": prompt}])
            return CompletionResponse(text="ok")

        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            raise NotImplementedError

    return Recording(sent=[])


def _llama(mode: str, metadata: bool) -> Callable[..., dict[str, Any]]:
    def render(docs: Sequence[str], question: str) -> dict[str, Any]:
        from llama_index.core import Settings
        from llama_index.core.response_synthesizers import get_response_synthesizer
        from llama_index.core.schema import NodeWithScore, TextNode

        llm = _llama_llm(100_000)
        previous = Settings._tokenizer
        Settings.tokenizer = str.split  # the default (tiktoken) downloads its vocabulary
        try:
            meta = [{"file_path": f"/kb/{len(text)}.md"} if metadata else {} for text in docs]
            nodes = [
                NodeWithScore(node=TextNode(text=t, metadata=m), score=1.0) for t, m in zip(docs, meta, strict=True)
            ]
            synthesizer = get_response_synthesizer(llm=llm, response_mode=mode)
            # off the main thread: there its token counting would create (and never close) an event loop
            with ThreadPoolExecutor(max_workers=1) as pool:
                pool.submit(synthesizer.synthesize, question, nodes).result()
        finally:
            Settings._tokenizer = previous
        return {"model": "m", "messages": llm.sent[0]}

    return render


def _llama_refine(metadata: bool) -> Callable[..., dict[str, Any]]:
    """The refine prompt a compact-and-refine synthesizer sends once its first pack overflowed the window.

    The synthesizer repacks overflowing text into window-sized slices (cutting documents anywhere), so this
    renders the chat refine template itself with whole nodes, as LlamaIndex renders them, for its context.
    """

    def render(docs: Sequence[str], question: str) -> dict[str, Any]:
        from llama_index.core.prompts.chat_prompts import CHAT_REFINE_PROMPT
        from llama_index.core.schema import MetadataMode, TextNode

        nodes = [TextNode(text=text, metadata={"file_path": f"/kb/{len(text)}.md"} if metadata else {})
                 for text in docs]  # fmt: skip
        context = "\n\n".join(node.get_content(metadata_mode=MetadataMode.LLM) for node in nodes)
        messages = CHAT_REFINE_PROMPT.format_messages(context_msg=context, query_str=question, existing_answer="ok")
        return {"model": "m", "messages": [{"role": m.role.value, "content": m.content} for m in messages]}

    return render


def _condense_plus_context(docs: Sequence[str], question: str) -> dict[str, Any]:
    """LlamaIndex's ``CondensePlusContextChatEngine``: the first turn's context prompt (a system message), rendered
    from the engine's own template and nodes as the engine renders them (the engine itself keeps its chat memory
    in an SQLite database that it never closes)."""
    from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONTEXT_PROMPT_TEMPLATE
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.schema import MetadataMode, TextNode

    context = "\n\n".join(TextNode(text=text).get_content(metadata_mode=MetadataMode.LLM) for text in docs)
    system = PromptTemplate(DEFAULT_CONTEXT_PROMPT_TEMPLATE).format(context_str=context)
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


# PromptBuilder's docstring (haystack/components/builders/prompt_builder.py)
HAYSTACK_DOCUMENTED = (
    "\n    Given these documents, answer the question.\n    Documents:\n    {% for doc in documents %}\n"
    "        {{ doc.content }}\n    {% endfor %}\n\n    Question: {{query}}\n    Answer:\n    "
)
# haystack.deepset.ai tutorial 27, "Creating Your First QA Pipeline with Retrieval-Augmentation"
HAYSTACK_TUTORIAL = (
    "\nGiven the following information, answer the question.\n\nContext:\n{% for document in documents %}\n"
    "    {{ document.content }}\n{% endfor %}\n\nQuestion: {{query}}\nAnswer:\n"
)


def _haystack(template: str) -> Callable[[Sequence[str], str], dict[str, Any]]:
    def render(docs: Sequence[str], question: str) -> dict[str, Any]:
        """``PromptBuilder`` renders the template; the pipeline sends it as the user message."""
        from haystack import Document
        from haystack.components.builders import PromptBuilder

        builder = PromptBuilder(template=template, required_variables=["documents", "query"])
        prompt = builder.run(documents=[Document(content=text) for text in docs], query=question)["prompt"]
        return {"model": "m", "messages": [{"role": "user", "content": prompt}]}

    return render


class Case:
    """One framework prompt: how to render it, where the documents end up, and the group the detector sees."""

    def __init__(self, name: str, render: Callable[[Sequence[str], str], dict[str, Any]], label: str) -> None:
        self.name = name
        self.render = render
        self.label = label  # find_groups' label for the raw template group

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("langchain RetrievalQA chat (CHAT_PROMPT)", lc_retrieval_qa_chat, "retrieval_qa_chat:paragraphs"),
    Case("langchain RetrievalQA completion (PROMPT)", lc_retrieval_qa, "retrieval_qa:paragraphs"),
    Case(
        "langchain create_retrieval_chain + hub retrieval-qa-chat",
        _retrieval_chain([("system", HUB_RETRIEVAL_QA_CHAT), ("human", "{input}")], "input"),
        "retrieval_qa_chat_hub:paragraphs",
    ),
    Case(
        "langchain stuff chain + hub rag-prompt",
        _retrieval_chain([("human", HUB_RAG_PROMPT)], "question"),
        "rag_prompt:paragraphs",
    ),
    Case(
        "langchain create_retrieval_chain + v0.3 tutorial system prompt",
        _retrieval_chain([("system", TUTORIAL_V03_SYSTEM), ("human", "{input}")], "input"),
        "rag_system:paragraphs",
    ),
    Case(
        "langchain v1 tutorial system prompt",
        _retrieval_chain([("system", TUTORIAL_V1_SYSTEM), ("human", "{input}")], "input"),
        "rag_system_v1:paragraphs",
    ),
    Case(
        "langchain create_retrieval_chain + conversational RAG system prompt",
        _retrieval_chain([("system", CONVERSATIONAL_SYSTEM), ("human", "{input}")], "input"),
        "qa_below_context:paragraphs",
    ),
    Case("langchain v1 agent tool result", lc_agent_tool, "agent_tool"),
    Case("llamaindex text-QA (compact)", _llama("compact", False), "text_qa:paragraphs"),
    Case("llamaindex text-QA with metadata", _llama("compact", True), "text_qa"),
    Case("llamaindex tree-summarize", _llama("tree_summarize", False), "tree_summarize:paragraphs"),
    Case("llamaindex tree-summarize with metadata", _llama("tree_summarize", True), "tree_summarize"),
    Case("llamaindex refine", _llama_refine(False), "refine:paragraphs"),
    Case("llamaindex refine with metadata", _llama_refine(True), "refine"),
    Case("llamaindex condense_plus_context chat engine", _condense_plus_context, "condense_plus_context:paragraphs"),
    Case("haystack PromptBuilder (documented RAG template)", _haystack(HAYSTACK_DOCUMENTED), "haystack_rag:paragraphs"),
    Case("haystack PromptBuilder (tutorial template)", _haystack(HAYSTACK_TUTORIAL), "haystack_tutorial:paragraphs"),
]
