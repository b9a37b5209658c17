"""The applications of ``bench apps``: small whole RAG and agent apps written on the real libraries.

Each app takes an :class:`AppRun` (the engine's or the gateway's origin, an httpx client that meters every exchange,
the questions and the retriever) and answers every question the way the library does it: its retriever, its
prompt, its chain or synthesizer or pipeline, and its own OpenAI or Anthropic client pointed at ``base_url``.
Nothing here builds a prompt by hand except where the app's author would (the Anthropic ``document`` blocks, the
Responses ``instructions``, a tool's result). The agents' tool calls are scripted: the engines behind the bench
(the simulated engine, a random-weight tiny model) never decide to call a tool, so each agent turn sends the
model call that carries the tool's result, as the agent loop would after the model asked for it.

LlamaIndex has no OpenAI LLM in ``llama-index-core`` (``llama-index-llms-openai`` is a separate package, not
installed), so its apps use a ``CustomLLM`` that calls the ``openai`` SDK: the prompts are LlamaIndex's own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from tests.frameworks import HAYSTACK_DOCUMENTED, HAYSTACK_TUTORIAL, HUB_RAG_PROMPT, TUTORIAL_V03_SYSTEM, quiet

__all__ = ["APPS", "App", "AppRun", "llama_rendered"]

MODEL = "m"
# the system prompt of a LangChain app that writes its own (python.langchain.com "chatbots" / retrieval how-to)
OWN_SYSTEM = "Answer the user's questions based on the below context:\n\n{context}"
# templates no framework ships and the gateway does not know: only traffic can teach it where the documents are
CUSTOM_SYSTEM = (
    "You are the assistant of a Python documentation site. Ground every answer in the excerpts below, and say so "
    "when they do not cover the question.\n\n{context}"
)
CUSTOM_USER = "Reference material:\n\n{context}\n\nUsing only the reference material above, answer: {question}"


@dataclass
class AppRun:
    """What one run of an app gets: where to send, how (a metered httpx client), what to ask, how to retrieve."""

    base_url: str  # the origin: ``http://127.0.0.1:PORT`` (OpenAI routes under ``/v1``)
    http: httpx.Client  # every SDK client of the run sends through it (it meters each exchange)
    http2: Any  # the same for the Anthropic SDK (an ``httpx2.Client``)
    transport: httpx.BaseTransport  # its transport, for libraries that build their own client (Haystack)
    questions: Sequence[str]
    retrieve: Callable[[str], list[str]]  # the texts of the top documents, best first
    corpus: Sequence[str] = ()  # every document (Haystack indexes them in its own store)
    max_tokens: int = 4

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


@dataclass(frozen=True)
class App:
    name: str
    kind: str  # "rag" (one retrieval per question), "chat" (a conversation), "agent" (tool results in history)
    run: Callable[[AppRun], None]
    not_on_llama: str = ""  # why the app measures nothing on llama-server (it is then skipped there)
    messages_api: bool = False  # sends Anthropic Messages (skipped on an engine that does not serve them)
    not_on_vllm: str = ""  # why the app cannot run on vLLM (it is then skipped there)


# ---------------------------------------------------------------------------------------------------- LangChain
def _lc_chat(run: AppRun) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, api_key="k", base_url=run.v1, http_client=run.http, max_tokens=run.max_tokens,  # type: ignore[arg-type]
                      temperature=0, max_retries=0)  # fmt: skip


def _lc_retriever(run: AppRun) -> Any:
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    class BM25Retriever(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any = None) -> list[Document]:
            return [Document(page_content=text) for text in run.retrieve(query)]

    return BM25Retriever()


def _format_docs(docs: Sequence[Any]) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


def lcel(system: str | None) -> Callable[[AppRun], None]:
    """The LCEL RAG chain of LangChain's docs: ``{"context": retriever | format_docs, "question": passthrough}``."""

    def app(run: AppRun) -> None:
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_core.runnables import RunnablePassthrough

        if system is None:
            prompt = ChatPromptTemplate.from_messages([("human", HUB_RAG_PROMPT)])
        elif "{question}" in system:  # one user message
            prompt = ChatPromptTemplate.from_messages([("human", system)])
        else:
            prompt = ChatPromptTemplate.from_messages([("system", system), ("human", "{question}")])
        context = _lc_retriever(run) | _format_docs
        chain = {"context": context, "question": RunnablePassthrough()} | prompt | _lc_chat(run) | StrOutputParser()
        for question in run.questions:
            chain.invoke(question)

    return app


def lc_retrieval_chain(run: AppRun) -> None:
    """``create_retrieval_chain`` + ``create_stuff_documents_chain``, the v0.3 RAG tutorial's system prompt."""
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", TUTORIAL_V03_SYSTEM), ("human", "{input}")])
    chain = create_retrieval_chain(_lc_retriever(run), create_stuff_documents_chain(_lc_chat(run), prompt))
    for question in run.questions:
        chain.invoke({"input": question})


def lc_retrieval_qa(run: AppRun) -> None:
    """``RetrievalQA.from_chain_type`` (stuff) with a chat model."""
    from langchain_classic.chains import RetrievalQA

    with quiet():
        chain = RetrievalQA.from_chain_type(llm=_lc_chat(run), retriever=_lc_retriever(run))
        for question in run.questions:
            chain.invoke({"query": question})


def lc_agent(run: AppRun) -> None:
    """A tool-calling agent with ``create_retriever_tool``: two questions per conversation, each answered after
    the tool's result; the second turn resends the first turn's tool result in its history."""
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
    from langchain_core.tools import create_retriever_tool

    tool = create_retriever_tool(_lc_retriever(run), "search_docs", "Search the Python standard library docs.")
    model = _lc_chat(run).bind_tools([tool])
    system = SystemMessage("You answer questions about Python. Use the search_docs tool, then answer.")
    for start in range(0, len(run.questions), 2):
        history: list[BaseMessage] = [system]
        for turn, question in enumerate(run.questions[start : start + 2]):
            call = {"name": "search_docs", "args": {"query": question}, "id": f"call_{start}_{turn}",
                    "type": "tool_call"}  # fmt: skip
            history += [HumanMessage(question), AIMessage("", tool_calls=[call]), tool.invoke(call)]
            history.append(model.invoke(history))


# --------------------------------------------------------------------------------------------------- LlamaIndex
def _llama_llm(run: AppRun) -> Any:
    import openai
    from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, LLMMetadata
    from llama_index.core.llms import CustomLLM

    client = openai.OpenAI(base_url=run.v1, api_key="k", http_client=run.http, max_retries=0)

    class OpenAIChat(CustomLLM):
        """LlamaIndex's prompts, sent with the ``openai`` SDK's chat completions."""

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(context_window=6000, num_output=run.max_tokens, is_chat_model=True, model_name=MODEL)

        def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
            sent = [{"role": m.role.value, "content": m.content or ""} for m in messages]
            answer = client.chat.completions.create(model=MODEL, messages=sent, max_tokens=run.max_tokens,  # type: ignore[arg-type]
                                                    temperature=0)  # fmt: skip
            return ChatResponse(message=ChatMessage(role="assistant", content=answer.choices[0].message.content))

        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
            response = self.chat([ChatMessage(role="user", content=prompt)])
            return CompletionResponse(text=response.message.content or "")

        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            raise NotImplementedError

    return OpenAIChat()


def llama_node(text: str, *, file_metadata: bool) -> Any:
    """A corpus document as a LlamaIndex node: bare, or with the metadata ``SimpleDirectoryReader`` leaves for the LLM
    (``file_path``; it excludes the file's name, type, size and dates from the prompt), one file per module."""
    from llama_index.core.schema import TextNode

    metadata = {"file_path": f"/srv/docs/python/{text.split('.', 1)[0]}.txt"} if file_metadata else {}
    return TextNode(text=text, id_=f"n{hash(text)}", metadata=metadata)


def llama_rendered(text: str) -> str:
    """How LlamaIndex puts a node with file metadata into a prompt (``file_path: ...``, a blank line, the text)."""
    from llama_index.core.schema import MetadataMode

    return str(llama_node(text, file_metadata=True).get_content(metadata_mode=MetadataMode.LLM))


def _llama_retriever(run: AppRun, *, file_metadata: bool = False) -> Any:
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, QueryBundle

    class BM25Retriever(BaseRetriever):
        def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
            texts = run.retrieve(query_bundle.query_str)
            return [NodeWithScore(node=llama_node(t, file_metadata=file_metadata), score=1.0) for t in texts]

    return BM25Retriever()


def _llama_settings(work: Callable[[], None]) -> None:
    """Run ``work`` with a whitespace tokenizer (the default, tiktoken, downloads its vocabulary), off the main
    thread (there LlamaIndex's token counting creates an event loop it never closes)."""
    from llama_index.core import Settings

    previous = Settings._tokenizer
    Settings.tokenizer = str.split
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(work).result()
    finally:
        Settings._tokenizer = previous


def llama_query(mode: str, *, file_metadata: bool = False) -> Callable[[AppRun], None]:
    """``RetrieverQueryEngine`` with the ``compact`` or ``tree_summarize`` synthesizer; with ``file_metadata``, its
    nodes carry the ``file_path`` that ``SimpleDirectoryReader`` (LlamaIndex's starter loader) gives them."""

    def app(run: AppRun) -> None:
        from llama_index.core.query_engine import RetrieverQueryEngine

        def work() -> None:
            retriever = _llama_retriever(run, file_metadata=file_metadata)
            engine = RetrieverQueryEngine.from_args(retriever, llm=_llama_llm(run), response_mode=mode)  # type: ignore[arg-type]
            for question in run.questions:
                engine.query(question)

        _llama_settings(work)

    return app


def llama_condense_plus_context(run: AppRun) -> None:
    """``CondensePlusContextChatEngine``: two questions per conversation (the second is condensed first)."""
    from llama_index.core.chat_engine import CondensePlusContextChatEngine
    from llama_index.core.memory import ChatMemoryBuffer

    def work() -> None:
        for start in range(0, len(run.questions), 2):
            # an in-memory history (the default ``Memory`` keeps it in aiosqlite, on an event loop of its own
            # that outlives the thread and complains when the thread ends)
            memory = ChatMemoryBuffer.from_defaults(token_limit=4000)
            engine = CondensePlusContextChatEngine.from_defaults(_llama_retriever(run), llm=_llama_llm(run),
                                                                 memory=memory)  # fmt: skip
            for question in run.questions[start : start + 2]:
                engine.chat(question)

    _llama_settings(work)


# ----------------------------------------------------------------------------------------------------- Haystack
def haystack(template: str) -> Callable[[AppRun], None]:
    """Pipeline: ``InMemoryBM25Retriever`` → ``ChatPromptBuilder`` (a user message of ``template``) →
    ``OpenAIChatGenerator``. Haystack retrieves with its own BM25 over the same chunks."""

    def app(run: AppRun) -> None:
        from haystack import Document, Pipeline
        from haystack.components.builders import ChatPromptBuilder
        from haystack.components.generators.chat import OpenAIChatGenerator
        from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
        from haystack.dataclasses import ChatMessage
        from haystack.document_stores.in_memory import InMemoryDocumentStore
        from haystack.utils import Secret

        # its warning on every answer cut at max_tokens (the bench asks for a few tokens on purpose)
        logging.getLogger("haystack.components.generators.chat.openai").setLevel(logging.ERROR)
        store = InMemoryDocumentStore()
        store.write_documents([Document(content=text) for text in run.corpus])
        pipeline = Pipeline()
        pipeline.add_component("retriever", InMemoryBM25Retriever(store, top_k=4))
        builder = ChatPromptBuilder(template=[ChatMessage.from_user(template)], required_variables="*")
        pipeline.add_component("prompt", builder)
        generator = OpenAIChatGenerator(
            api_key=Secret.from_token("k"),
            model=MODEL,
            api_base_url=run.v1,
            generation_kwargs={"max_tokens": run.max_tokens, "temperature": 0},
            max_retries=0,
            http_client_kwargs={"transport": run.transport},
        )
        pipeline.add_component("llm", generator)
        pipeline.connect("retriever.documents", "prompt.documents")
        pipeline.connect("prompt.prompt", "llm.messages")
        for question in run.questions:
            pipeline.run({"retriever": {"query": question}, "prompt": {"query": question}})

    return app


# ---------------------------------------------------------------------------------------------------- Anthropic
def _anthropic(run: AppRun) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=run.base_url, api_key="k", http_client=run.http2, max_retries=0)


def anthropic_documents(run: AppRun) -> None:
    """Messages with one ``document`` block per retrieved chunk before the question (Anthropic's RAG recipe)."""
    client = _anthropic(run)
    for question in run.questions:
        docs = [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text},
                 "title": text.split("\n", 1)[0]} for text in run.retrieve(question)]  # fmt: skip
        content = [*docs, {"type": "text", "text": question}]
        client.messages.create(model=MODEL, max_tokens=run.max_tokens, system="Answer from the documents.",
                               messages=[{"role": "user", "content": content}])  # fmt: skip


_SEARCH_TOOL = {
    "name": "search_docs",
    "description": "Search the Python standard library docs.",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}


def anthropic_tool_agent(run: AppRun) -> None:
    """Two-turn tool agent on Messages: ``tool_use`` then a ``tool_result`` with the retrieved chunks (one text
    block each); the second question's call resends the first turn's result."""
    client = _anthropic(run)
    for start in range(0, len(run.questions), 2):
        messages: list[dict[str, Any]] = []
        for turn, question in enumerate(run.questions[start : start + 2]):
            use_id = f"toolu_{start}_{turn}"
            results = [{"type": "text", "text": text} for text in run.retrieve(question)]
            messages += [
                {"role": "user", "content": question},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": use_id, "name": "search_docs", "input": {"query": question}}
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_id, "content": results}]},
            ]
            answer = client.messages.create(model=MODEL, max_tokens=run.max_tokens, tools=[_SEARCH_TOOL],
                                            messages=messages)  # fmt: skip
            text = "".join(block.text for block in answer.content if block.type == "text") or "ok"
            messages.append({"role": "assistant", "content": text})


# ----------------------------------------------------------------------------------------------- OpenAI Responses
def _openai(run: AppRun) -> Any:
    import openai

    return openai.OpenAI(base_url=run.v1, api_key="k", http_client=run.http, max_retries=0)


def responses_instructions(run: AppRun) -> None:
    """Responses with the numbered sources in ``instructions`` and a cite-by-number rule."""
    client = _openai(run)
    for question in run.questions:
        sources = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(run.retrieve(question), 1))
        instructions = f"Answer using the sources below. Cite them as [n].\n\nSources:\n\n{sources}"
        client.responses.create(model=MODEL, instructions=instructions, input=question,
                                max_output_tokens=max(run.max_tokens, 16))  # fmt: skip


def responses_function_call_output(run: AppRun) -> None:
    """Responses with a ``function_call`` and its ``function_call_output`` (the retrieved chunks as JSON), two
    questions per conversation, the second resending the first turn's items."""
    client = _openai(run)
    tool = {"type": "function", "name": "search_docs", "description": "Search the Python standard library docs.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}  # fmt: skip
    for start in range(0, len(run.questions), 2):
        items: list[dict[str, Any]] = []
        for turn, question in enumerate(run.questions[start : start + 2]):
            call_id = f"call_{start}_{turn}"
            output = json.dumps({"results": [{"text": text} for text in run.retrieve(question)]})
            items += [
                {"type": "message", "role": "user", "content": question},
                {
                    "type": "function_call",
                    "call_id": call_id,
                    "name": "search_docs",
                    "arguments": json.dumps({"query": question}),
                },
                {"type": "function_call_output", "call_id": call_id, "output": output},
            ]
            answer = client.responses.create(model=MODEL, input=items, tools=[tool],
                                             max_output_tokens=max(run.max_tokens, 16))  # fmt: skip
            items.append({"type": "message", "role": "assistant", "content": answer.output_text or "ok"})


APPS: list[App] = [
    App("langchain LCEL (hub rag-prompt)", "rag", lcel(None)),
    App("langchain LCEL (own system prompt)", "rag", lcel(OWN_SYSTEM)),
    App("langchain LCEL (custom system prompt)", "rag", lcel(CUSTOM_SYSTEM)),
    App("langchain LCEL (custom user template)", "rag", lcel(CUSTOM_USER)),
    App("langchain create_retrieval_chain", "rag", lc_retrieval_chain),
    App("langchain RetrievalQA", "rag", lc_retrieval_qa),
    App("langchain agent + retriever tool", "agent", lc_agent),
    App("llamaindex compact", "rag", llama_query("compact")),
    App("llamaindex tree_summarize", "rag", llama_query("tree_summarize")),
    App("llamaindex compact (file metadata)", "rag", llama_query("compact", file_metadata=True)),
    App("llamaindex condense_plus_context", "chat", llama_condense_plus_context),
    App("haystack ChatPromptBuilder (tutorial)", "rag", haystack(HAYSTACK_TUTORIAL)),
    App("haystack ChatPromptBuilder (documented)", "rag", haystack(HAYSTACK_DOCUMENTED)),
    App(
        "anthropic document blocks",
        "rag",
        anthropic_documents,
        not_on_llama="llama-server's /v1/messages drops document blocks (the prompt holds only the question)",
        not_on_vllm="vLLM's /v1/messages refuses document blocks (400: only text, image, tool_use, tool_result...)",
        messages_api=True,
    ),
    App("anthropic two-turn tool agent", "agent", anthropic_tool_agent, messages_api=True),
    App("responses instructions [n]", "rag", responses_instructions),
    App("responses function_call_output", "agent", responses_function_call_output),
]
