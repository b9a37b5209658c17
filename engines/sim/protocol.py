"""OpenAI wire shapes for the simulated engine: request views, validation into a ``Job``, response and chunk bodies.

Only the fields the engine acts on are decoded (msgspec ignores the rest, so unknown vendor fields are tolerated).
Validation failures raise ``RequestError``, rendered as the OpenAI error envelope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from engines.sim.tokenizer import VOCAB_SIZE, ChatTurn, Tokenizer

__all__ = [
    "DONE",
    "ChatRequest",
    "ChunkWriter",
    "CompletionRequest",
    "Job",
    "RequestError",
    "chat_job",
    "check_header_request_id",
    "completion_job",
    "encode",
    "error_body",
    "response_body",
    "usage",
]

_encoder = msgspec.json.Encoder()
encode = _encoder.encode


class RequestError(Exception):
    """A request the engine refuses; ``status``/``type``/``param`` go into the OpenAI error envelope."""

    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type_


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> bytes:
    return encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False


class _Request(msgspec.Struct, kw_only=True):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    max_tokens: int | None = None
    rid: str | list[str] | None = None
    request_id: str | None = None


class CompletionRequest(_Request, kw_only=True):
    prompt: str | list[Any]


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: str | None = None


class ChatRequest(_Request, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: Any = None


_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_chat_decoder = msgspec.json.Decoder(ChatRequest)


@dataclass(slots=True)
class Job:
    """One validated generation request: prompts as tokens and the generation parameters."""

    chat: bool
    model: str
    prompts: list[tuple[int, ...]]
    n: int
    max_tokens: int
    stream: bool
    include_usage: bool
    body_rids: list[str] | None
    api: str = "openai"  # or "messages" (Anthropic), "responses" (OpenAI Responses): see engines.sim.apis
    citation: Any = None  # messages: the document the answer cites (engines.sim.apis.Citation)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = None
        if " - at `$." in text:
            param = text.rsplit(" - at `$.", 1)[1].rstrip("`")
        raise RequestError(text, param=param) from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"Invalid JSON body: {exc}") from exc


def _common(req: _Request, default_model: str, max_tokens: int | None, defaults: tuple[int, int, int]) -> Job:
    default_max_tokens, max_tokens_limit, max_n = defaults
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_n:
        raise RequestError(f"n must be between 1 and {max_n}", param="n")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not 0 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"max_tokens must be between 0 and {max_tokens_limit}", param="max_tokens")
    rids: list[str] | None = None
    if isinstance(req.rid, str):
        rids = [req.rid]
    elif req.rid:
        rids = req.rid
    elif req.request_id:
        rids = [req.request_id]
    for rid in rids or ():
        _check_request_id(rid, "rid")
    stream = bool(req.stream)
    include_usage = bool(stream and req.stream_options is not None and req.stream_options.include_usage)
    return Job(
        chat=False,
        model=req.model or default_model,
        prompts=[],
        n=n,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        body_rids=rids,
    )


def _check_request_id(rid: str, param: str) -> None:
    if not rid or len(rid) > 512 or not rid.isprintable() or not rid.isascii():
        raise RequestError("request ids must be 1-512 printable ASCII characters", param=param)


def check_header_request_id(rid: str) -> None:
    _check_request_id(rid, "X-Request-Id")


def _token_prompt(values: list[Any], param: str) -> tuple[int, ...]:
    for value in values:
        if type(value) is not int or not 0 <= value < VOCAB_SIZE:
            raise RequestError(f"token ids must be integers in [0, {VOCAB_SIZE})", param=param)
    return tuple(values)


def completion_job(body: bytes, tokenizer: Tokenizer, default_model: str, defaults: tuple[int, int, int]) -> Job:
    """Validate a ``/v1/completions`` body; ``prompt`` may be str, [str], [int] or [[int]] (a batch)."""
    req: CompletionRequest = _decode(_completion_decoder, body)
    job = _common(req, default_model, req.max_tokens, defaults)
    prompt = req.prompt
    if isinstance(prompt, str):
        job.prompts = [tokenizer.encode(prompt)]
    elif not prompt:
        raise RequestError("prompt must not be an empty list", param="prompt")
    elif all(isinstance(p, str) for p in prompt):
        job.prompts = [tokenizer.encode(p) for p in prompt]
    elif all(isinstance(p, list) for p in prompt):
        job.prompts = [_token_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        job.prompts = [_token_prompt(prompt, "prompt")]
    if job.body_rids is not None and len(job.body_rids) not in (1, len(job.prompts)):
        raise RequestError("rid must be a string or a list with one id per prompt", param="rid")
    return job


def _message_text(message: Message) -> str:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(encode(part).decode())
        text = "\n".join(parts)
    if message.tool_calls is not None:
        text += "\n<tool_calls>" + encode(message.tool_calls).decode()
    if message.tool_call_id is not None:
        text = f"<tool_call_id>{message.tool_call_id}\n{text}"
    return text


def chat_job(body: bytes, tokenizer: Tokenizer, default_model: str, defaults: tuple[int, int, int]) -> Job:
    """Validate a ``/v1/chat/completions`` body and render its messages through the chat template."""
    req: ChatRequest = _decode(_chat_decoder, body)
    if not req.messages:
        raise RequestError("messages must not be empty", param="messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    job = _common(req, default_model, max_tokens, defaults)
    job.chat = True
    turns: list[ChatTurn] = []
    for message in req.messages:
        role = message.role if message.name is None else f"{message.role} name={message.name}"
        turns.append((role, _message_text(message)))
    tools = None if req.tools is None else encode(req.tools).decode()
    job.prompts = [tuple(tokenizer.render_chat(turns, tools))]
    if job.body_rids is not None and len(job.body_rids) != 1:
        raise RequestError("rid must be a single id for chat completions", param="rid")
    return job


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response_body(
    job: Job, response_id: str, created: int, texts: list[str], *, usage_: dict[str, Any], timings: dict[str, Any]
) -> bytes:
    """The non-streaming response: one choice per (prompt, n) pair, in OpenAI index order."""
    if job.chat:
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "length",
            }
            for i, text in enumerate(texts)
        ]
        kind = "chat.completion"
    else:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "length"} for i, text in enumerate(texts)
        ]
        kind = "text_completion"
    return encode(
        {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": job.model,
            "choices": choices,
            "usage": usage_,
            "timings": timings,
        }
    )


class ChunkWriter:
    """Builds the SSE events of one streamed response."""

    __slots__ = ("_base", "_chat", "_usage_null")

    def __init__(self, job: Job, response_id: str, created: int) -> None:
        self._chat = job.chat
        self._usage_null = job.include_usage
        self._base: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": created,
            "model": job.model,
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {**self._base, "choices": choices, **extra}
        if self._usage_null and "usage" not in extra:
            payload["usage"] = None
        return b"data: " + encode(payload) + b"\n\n"

    def role(self, index: int) -> bytes:
        delta = {"role": "assistant", "content": ""}
        return self._event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def token(self, index: int, text: str) -> bytes:
        if self._chat:
            choice = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
        return self._event([choice])

    def finish(self, index: int, timings: dict[str, Any] | None) -> bytes:
        if self._chat:
            choice: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": "length"}
        return self._event([choice]) if timings is None else self._event([choice], timings=timings)

    def usage(self, usage_: dict[str, Any], timings: dict[str, Any]) -> bytes:
        return self._event([], usage=usage_, timings=timings)

    @staticmethod
    def error(message: str, type_: str, code: int) -> bytes:
        return b"data: " + error_body(message, type_, None, code) + b"\n\n"


DONE = b"data: [DONE]\n\n"
