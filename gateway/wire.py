"""A completion request body, decoded once into a view that keeps the client's bytes, and encoded once.

``decode_request`` reads the top level as ``dict[str, msgspec.Raw]`` and decodes, from those raw values, only
the typed fields the request path reads: ``stream``, and the chat ``messages`` (each with its own raw fields,
its ``role`` and ``content``) or the completion ``prompt``. Validation errors name the offending field in
``param`` (``messages[0].content``). Changes are recorded per top-level field (``RequestBody.set``) and
``RequestBody.encode`` writes the body once: every field not changed keeps its exact bytes, and a body nobody
changed is forwarded as it came (msgspec drops unknown fields when decoding into a Struct, so a decoded request
is never re-encoded as a whole).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import InvalidRequest

__all__ = [
    "CHAT_ROUTE",
    "COMPLETIONS_ROUTE",
    "ChatMessage",
    "RequestBody",
    "decode_request",
    "malformed_json_is_400",
    "split_error_path",
]

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"

Content = str | list[dict[str, Any]] | None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_list = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()
_FIELDS: dict[str, msgspec.json.Decoder[Any]] = {  # top-level fields checked for their type (400 otherwise)
    "model": msgspec.json.Decoder(str | None),
    "stream": msgspec.json.Decoder(bool | None),
    "stream_options": msgspec.json.Decoder(_StreamOptions | None),
    "n": msgspec.json.Decoder(int | None),
}
_role = msgspec.json.Decoder(str)
_content = msgspec.json.Decoder(Content)
_prompt = msgspec.json.Decoder(str | list[Any])
_PATH = re.compile(r" - at `\$\.?(.*)`$")


@dataclass(slots=True)
class ChatMessage:
    """One chat message: as sent (``raw``), its fields as sent, and the two the planner reads."""

    raw: msgspec.Raw
    fields: dict[str, msgspec.Raw]
    role: str
    content: Content

    def with_content(self, content: str | list[dict[str, Any]]) -> msgspec.Raw:
        """The message with ``content`` replaced; its other fields keep their exact bytes."""
        return msgspec.Raw(_encoder.encode({**self.fields, "content": content}))


class RequestBody:
    """A completion request: its raw top-level fields, the typed fields the path reads, and the changes to send."""

    __slots__ = ("changes", "messages", "prompt", "raw", "route", "stream", "top")

    def __init__(
        self,
        raw: bytes,
        route: str,
        top: dict[str, msgspec.Raw],
        *,
        stream: bool,
        messages: list[ChatMessage] | None = None,
        prompt: str | list[Any] | None = None,
    ) -> None:
        self.raw = raw
        self.route = route
        self.top = top
        self.stream = stream
        self.messages = messages  # chat requests
        self.prompt = prompt  # completion requests
        self.changes: dict[str, Any] = {}

    def __contains__(self, name: object) -> bool:
        """Whether the client sent the top-level field ``name``."""
        return name in self.top

    def update(self, fields: Mapping[str, Any]) -> None:
        """Replace (or add) top-level fields in what will be sent upstream."""
        self.changes.update(fields)

    def encode(self) -> bytes:
        """The body to send: the client's bytes when nothing changed, else one encode of the merged fields."""
        if not self.changes:
            return self.raw
        return _encoder.encode({**self.top, **self.changes})


def decode_request(raw: bytes, route: str) -> RequestBody:
    """Decode a chat or completion request body once, or raise a 400 naming the offending field."""
    with malformed_json_is_400():
        try:
            top = _object.decode(raw)
        except msgspec.ValidationError:
            raise InvalidRequest("request body must be a JSON object", code="invalid_body") from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        typed = {name: _typed(decoder, top[name], name) for name, decoder in _FIELDS.items() if name in top}
        stream = bool(typed.get("stream"))
        if route == CHAT_ROUTE:
            return RequestBody(raw, route, top, stream=stream, messages=_messages(_required(top, "messages")))
        prompt = _typed(_prompt, _required(top, "prompt"), "prompt")
        _check_prompt(prompt)
        return RequestBody(raw, route, top, stream=stream, prompt=prompt)


def _messages(raw: msgspec.Raw) -> list[ChatMessage]:
    messages = []
    for i, message in enumerate(_typed(_list, raw, "messages")):
        fields = _typed(_object, message, f"messages[{i}]")
        role = _typed(_role, _required(fields, "role", f"messages[{i}].role"), f"messages[{i}].role")
        content = _typed(_content, fields["content"], f"messages[{i}].content") if "content" in fields else None
        messages.append(ChatMessage(message, fields, role, content))
    return messages


def _required(fields: dict[str, msgspec.Raw], name: str, param: str | None = None) -> msgspec.Raw:
    value = fields.get(name)
    if value is None:
        raise InvalidRequest(f"missing required parameter: '{name}'", param=param or name, code="missing")
    return value


def _typed(decoder: msgspec.json.Decoder[Any], raw: msgspec.Raw, param: str) -> Any:
    """Decode one field's raw value; a wrong type is a 400 whose ``param`` is the full path to it."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message, inner = split_error_path(str(exc))
        if inner:
            param += inner if inner.startswith("[") else f".{inner}"
        raise InvalidRequest(f"invalid type for '{param}': {message}", param=param, code="invalid_type") from None


def _check_prompt(prompt: str | list[Any]) -> None:
    """``prompt`` is ``str | list[str] | list[int] | list[list[int]]`` (no booleans for ints)."""
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
