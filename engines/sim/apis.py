"""Anthropic Messages and OpenAI Responses wire shapes for the simulated engine.

Both render through the same chat template as ``/v1/chat/completions`` (``text`` and ``input_text`` parts as text,
any other block as its JSON), so the cache sees the same tokens for the same blocks in the same order. ``n`` is
always 1. Usage carries the cached prompt tokens the way each API reports them: ``cache_read_input_tokens``
(Messages; ``input_tokens`` is then the uncached rest) and ``input_tokens_details.cached_tokens`` (Responses); the
final body or event also carries llama.cpp-style ``timings`` (simulated prefill time), as llama-server's do.

Citations: when a Messages request holds ``document`` blocks with ``citations.enabled``, the answer cites the
first of them *as received*, by its position among all document blocks of the request (``document_index``), with
its title and the start of its text, as the Anthropic API would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec

from engines.sim.protocol import Job, RequestError, _common, _decode, _Request, encode
from engines.sim.tokenizer import ChatTurn, Tokenizer

__all__ = ["Citation", "MessagesWriter", "ResponsesWriter", "messages_job", "responses_job"]


class _Message(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]]


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int
    messages: list[_Message]
    system: str | list[dict[str, Any]] | None = None
    stream: bool | None = False
    tools: Any = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    stream: bool | None = False
    tools: Any = None
    request_id: str | None = None


_messages_decoder = msgspec.json.Decoder(MessagesRequest)
_responses_decoder = msgspec.json.Decoder(ResponsesRequest)


@dataclass(frozen=True, slots=True)
class Citation:
    """What the answer cites: a document by its position in the request."""

    document_index: int
    title: str | None
    text: str

    def wire(self) -> dict[str, Any]:
        cited = self.text[:40]
        return {
            "type": "char_location",
            "cited_text": cited,
            "document_index": self.document_index,
            "document_title": self.title,
            "start_char_index": 0,
            "end_char_index": len(cited),
        }


class _Documents:
    """Counts document blocks in request order and remembers the first one that asks for citations."""

    def __init__(self) -> None:
        self.count = 0
        self.cited: Citation | None = None

    def see(self, block: dict[str, Any]) -> None:
        index, self.count = self.count, self.count + 1
        settings = block.get("citations")
        if self.cited is not None or not (isinstance(settings, dict) and settings.get("enabled") is True):
            return
        source = block.get("source")
        if not isinstance(source, dict):
            source = {}
        text = source.get("data") if source.get("type") == "text" else source.get("content")
        if isinstance(text, list):
            text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
        title = block.get("title")
        self.cited = Citation(index, title if isinstance(title, str) else None, text if isinstance(text, str) else "")


def _blocks_text(blocks: str | list[Any], documents: _Documents) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for block in blocks:
        if not isinstance(block, dict):
            parts.append(encode(block).decode())
        elif block.get("type") in ("text", "input_text") and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif block.get("type") == "tool_result" and block.get("content") is not None:
            parts.append(f"<tool_result>{_blocks_text(block['content'], documents)}")
        else:
            if block.get("type") == "document":
                documents.see(block)
            parts.append(encode(block).decode())
    return "\n".join(parts)


def messages_job(body: bytes, tokenizer: Tokenizer, default_model: str, defaults: tuple[int, int, int]) -> Job:
    """Validate a ``/v1/messages`` body and render it through the chat template."""
    req: MessagesRequest = _decode(_messages_decoder, body)
    if not req.messages:
        raise RequestError("messages: at least one message is required", param="messages")
    job = _common(_Request(model=req.model, stream=req.stream), default_model, req.max_tokens, defaults)
    documents = _Documents()
    turns: list[ChatTurn] = []
    if req.system is not None:
        turns.append(("system", _blocks_text(req.system, documents)))
    for message in req.messages:
        if message.role not in ("user", "assistant"):
            raise RequestError(f"messages: unexpected role {message.role!r}", param="messages")
        turns.append((message.role, _blocks_text(message.content, documents)))
    tools = None if req.tools is None else encode(req.tools).decode()
    job.prompts = [tuple(tokenizer.render_chat(turns, tools))]
    job.api, job.citation = "messages", documents.cited
    return job


def responses_job(body: bytes, tokenizer: Tokenizer, default_model: str, defaults: tuple[int, int, int]) -> Job:
    """Validate a ``/v1/responses`` body and render it through the chat template."""
    req: ResponsesRequest = _decode(_responses_decoder, body)
    options = _Request(model=req.model, stream=req.stream, request_id=req.request_id)
    job = _common(options, default_model, req.max_output_tokens, defaults)
    documents = _Documents()
    turns: list[ChatTurn] = []
    if req.instructions is not None:
        turns.append(("system", req.instructions))
    if isinstance(req.input, str):
        turns.append(("user", req.input))
    for item in req.input if isinstance(req.input, list) else ():
        kind = item.get("type", "message")
        if kind == "message" and isinstance(item.get("role"), str):
            turns.append((item["role"], _blocks_text(item.get("content") or "", documents)))
        elif kind == "function_call_output":
            turns.append(("tool", _blocks_text(item.get("output") or "", documents)))
        else:
            turns.append(("assistant" if kind == "function_call" else "tool", encode(item).decode()))
    if not turns:
        raise RequestError("input must not be empty", param="input")
    tools = None if req.tools is None else encode(req.tools).decode()
    job.prompts = [tuple(tokenizer.render_chat(turns, tools))]
    job.api = "responses"
    return job


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + encode(payload) + b"\n\n"


class MessagesWriter:
    """Bodies and SSE events of a Messages answer."""

    def __init__(self, job: Job, response_id: str) -> None:
        self.job, self.id = job, "msg_" + response_id
        self.citation: Citation | None = job.citation

    @staticmethod
    def usage(prompt: int, cached: int, output: int) -> dict[str, Any]:
        return {
            "input_tokens": prompt - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": output,
        }

    def _text_block(self, text: str) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "text", "text": text}
        if self.citation is not None:
            block["citations"] = [self.citation.wire()]
        return block

    def _message(self, content: list[Any], usage: dict[str, Any], stop: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.job.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }

    def body(self, text: str, usage: dict[str, Any], timings: dict[str, Any]) -> bytes:
        return encode({**self._message([self._text_block(text)], usage, "max_tokens"), "timings": timings})

    def head(self, usage: dict[str, Any]) -> bytes:
        start = _sse("message_start", {"type": "message_start", "message": self._message([], usage, None)})
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        events = [start, _sse("content_block_start", block)]
        if self.citation is not None:
            delta = {"type": "citations_delta", "citation": self.citation.wire()}
            events.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
        return b"".join(events)

    def token(self, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def tail(self, text: str, usage: dict[str, Any], timings: dict[str, Any]) -> bytes:
        del text
        delta = {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None}, "usage": usage}
        return b"".join(
            (
                _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse("message_delta", {**delta, "timings": timings}),
                _sse("message_stop", {"type": "message_stop"}),
            )
        )

    def error(self, message: str) -> bytes:
        return _sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})


class ResponsesWriter:
    """Bodies and SSE events of a Responses answer."""

    def __init__(self, job: Job, response_id: str) -> None:
        self.job, self.id, self.item = job, "resp_" + response_id, "msg_" + response_id
        self.created = int(time.time())
        self.sequence = 0

    @staticmethod
    def usage(prompt: int, cached: int, output: int) -> dict[str, Any]:
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        }

    def _item(self, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": []}
        return {"type": "message", "id": self.item, "status": status, "role": "assistant", "content": [part]}

    def _response(self, status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.job.model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }

    def body(self, text: str, usage: dict[str, Any], timings: dict[str, Any]) -> bytes:
        return encode({**self._response("completed", [self._item(text, "completed")], usage), "timings": timings})

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return _sse(kind, payload)

    def head(self, usage: dict[str, Any]) -> bytes:
        del usage
        at = {"output_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        return b"".join(
            (
                self._event("response.created", response=self._response("in_progress", [], None)),
                self._event("response.in_progress", response=self._response("in_progress", [], None)),
                self._event("response.output_item.added", item={**self._item("", "in_progress"), "content": []}, **at),
                self._event("response.content_part.added", item_id=self.item, content_index=0, part=part, **at),
            )
        )

    def token(self, text: str) -> bytes:
        return self._event(
            "response.output_text.delta", item_id=self.item, output_index=0, content_index=0, delta=text, logprobs=[]
        )

    def tail(self, text: str, usage: dict[str, Any], timings: dict[str, Any]) -> bytes:
        at = {"output_index": 0}
        item = self._item(text, "completed")
        return b"".join(
            (
                self._event(
                    "response.output_text.done", item_id=self.item, content_index=0, text=text, logprobs=[], **at
                ),
                self._event(
                    "response.content_part.done", item_id=self.item, content_index=0, part=item["content"][0], **at
                ),
                self._event("response.output_item.done", item=item, **at),
                self._event("response.completed", response=self._response("completed", [item], usage), timings=timings),
            )
        )

    def error(self, message: str) -> bytes:
        return self._event("error", code="server_error", message=message, param=None)
