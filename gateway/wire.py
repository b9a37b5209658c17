"""Small typed views of OpenAI request bodies, and field-level rewriting that keeps every other byte.

The gateway never re-encodes a decoded request: msgspec drops unknown fields when decoding into a
Struct. A view reads only what routing needs (``stream``, ``messages``, ``prompt``); a rewrite decodes
the body as ``dict[str, msgspec.Raw]`` and replaces only the fields it changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from gateway.errors import InvalidRequest

__all__ = [
    "ChatView",
    "CompletionView",
    "Message",
    "decode_view",
    "malformed_json_is_400",
    "replace_fields",
    "split_error_path",
]


class Message(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ChatView(msgspec.Struct):
    messages: list[Message]
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None


class CompletionView(msgspec.Struct):
    """``prompt`` is ``str | list[str] | list[int] | list[list[int]]``; checked by ``_check_prompt``."""

    prompt: str | list[Any]
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None


_raw_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    ChatView: msgspec.json.Decoder(ChatView),
    CompletionView: msgspec.json.Decoder(CompletionView),
}
V = TypeVar("V", bound=msgspec.Struct)
_PATH = re.compile(r" - at `\$\.?(.*)`$")


def _any_json(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def decode_view(body: bytes, view: type[V]) -> V:
    """Decode ``body`` into ``view`` or raise a 400 naming the offending field in ``param``."""
    try:
        decoded: V = _decoders[view].decode(body)
    except msgspec.ValidationError as exc:
        if not isinstance(_any_json(body), dict):
            raise InvalidRequest("request body must be a JSON object", code="invalid_body") from None
        message, param = split_error_path(str(exc))
        if message.startswith("Object missing required field"):
            field = message.split("`")[1]
            raise InvalidRequest(f"missing required parameter: '{field}'", param=field, code="missing") from None
        raise InvalidRequest(f"invalid type for '{param}': {message}", param=param, code="invalid_type") from None
    except msgspec.DecodeError:
        _any_json(body)
        raise  # pragma: no cover - _any_json raised already
    if isinstance(decoded, CompletionView):
        _check_prompt(decoded.prompt)
    return decoded


def _check_prompt(prompt: str | list[Any]) -> None:
    if isinstance(prompt, str):
        return
    if all(isinstance(p, str) for p in prompt):
        return
    if all(type(p) is int for p in prompt):
        return
    if all(isinstance(p, list) and all(type(t) is int for t in p) for p in prompt):
        return
    raise InvalidRequest(
        "invalid type for 'prompt': expected a string, a list of strings, a list of token ids "
        "or a list of token-id lists",
        param="prompt",
        code="invalid_type",
    )


@contextmanager
def malformed_json_is_400() -> Iterator[None]:
    """msgspec's two failures that are not ``DecodeError``s, as the 400 they are."""
    try:
        yield
    except RecursionError:
        # msgspec refuses nesting deeper than the interpreter's recursion limit; no OpenAI body nests that deep
        raise InvalidRequest("request body is nested too deeply", code="invalid_json") from None
    except UnicodeDecodeError:
        # invalid UTF-8 inside a JSON string surfaces as a UnicodeDecodeError, not a DecodeError
        raise InvalidRequest("request body is not valid UTF-8 JSON", code="invalid_json") from None


def split_error_path(text: str) -> tuple[str, str | None]:
    """Split a msgspec validation message into its text and the field path (``messages[0].content``)."""
    match = _PATH.search(text)
    return _PATH.sub("", text), match.group(1) if match else None


def replace_fields(body: bytes, fields: dict[str, Any]) -> bytes:
    """Set top-level ``fields`` in a JSON object body; every other field keeps its exact bytes."""
    if not fields:
        return body
    raw = _raw_object.decode(body)
    for key, value in fields.items():
        raw[key] = msgspec.Raw(_encoder.encode(value))
    return _encoder.encode(raw)
