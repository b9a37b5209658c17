"""A completion request body, decoded once into a view that keeps the client's bytes, and encoded once.

``decode_request`` makes one pass over the body for the typed fields the request path reads (``stream``; the chat
``messages``, each kept as its raw fields, or the completion ``prompt``), then decodes each message's ``role`` and
``content`` from its raw fields. The top level as ``dict[str, msgspec.Raw]`` (``RequestBody.top``) and the raw
message list are decoded only when asked for: to plan, or to write changes. Validation errors name the offending
field in ``param`` (``messages[0].content``). Changes are recorded per top-level field (``RequestBody.update``)
and ``RequestBody.encode`` writes the body once: every field not changed keeps its exact bytes, and a body nobody
changed is forwarded as it came (msgspec drops unknown fields when decoding into a Struct, so a decoded request
is never re-encoded as a whole).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import InvalidRequest, malformed_json_is_400, split_error_path
from gateway.wire import SHAPES

__all__ = [
    "CHAT_ROUTE",
    "COMPLETIONS_ROUTE",
    "ChatMessage",
    "RequestBody",
    "decode_request",
]

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"

Content = str | list[dict[str, Any]] | None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _Chat(msgspec.Struct):
    messages: list[dict[str, msgspec.Raw]]
    model: str | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    n: int | None = None


class _Completion(msgspec.Struct):
    prompt: str | list[Any]
    model: str | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    n: int | None = None


_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_list = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()
_views: dict[str, msgspec.json.Decoder[Any]] = {
    CHAT_ROUTE: msgspec.json.Decoder(_Chat),
    COMPLETIONS_ROUTE: msgspec.json.Decoder(_Completion),
    **{route: msgspec.json.Decoder(shape.view) for route, shape in SHAPES.items()},  # Messages, Responses
}
_role = msgspec.json.Decoder(str)
_content = msgspec.json.Decoder(Content)


@dataclass(slots=True)
class ChatMessage:
    """One chat message: its fields as sent, and the two the planner reads."""

    fields: dict[str, msgspec.Raw]
    role: str
    content: Content

    def with_content(self, content: str | list[dict[str, Any]]) -> msgspec.Raw:
        """The message with ``content`` replaced; its other fields keep their exact bytes."""
        return msgspec.Raw(_encoder.encode({**self.fields, "content": content}))


class RequestBody:
    """A completion request: its raw top-level fields, the typed fields the path reads, and the changes to send."""

    __slots__ = ("_top", "changes", "messages", "prompt", "raw", "route", "stream")

    def __init__(
        self,
        raw: bytes,
        route: str,
        *,
        stream: bool,
        messages: list[ChatMessage] | None = None,
        prompt: str | list[Any] | None = None,
    ) -> None:
        self.raw = raw
        self.route = route
        self._top: dict[str, msgspec.Raw] | None = None
        self.stream = stream
        self.messages = messages  # chat requests
        self.prompt = prompt  # completion requests
        self.changes: dict[str, Any] = {}

    @property
    def top(self) -> dict[str, msgspec.Raw]:
        """The top-level fields as sent (decoded on first use)."""
        if self._top is None:
            self._top = _object.decode(self.raw)
        return self._top

    def raw_messages(self) -> list[msgspec.Raw]:
        """The chat messages as sent, each as its exact bytes (a new list on every call)."""
        return _list.decode(self.top["messages"])

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
    """Decode a completion-route body once (chat, completions, or a ``gateway.wire`` shape: Messages, Responses),
    or raise a 400 naming the offending field."""
    with malformed_json_is_400():
        try:
            view = _views[route].decode(raw)
        except msgspec.ValidationError as exc:
            message, param = split_error_path(str(exc))
            if param is None and message.startswith("Expected `object`"):
                raise InvalidRequest("request body must be a JSON object", code="invalid_body") from None
            if message.startswith("Object missing required field"):
                name = message.split("`")[1]
                param = f"{param}.{name}" if param else name
                raise InvalidRequest(f"missing required parameter: '{name}'", param=param, code="missing") from None
            raise InvalidRequest(f"invalid type for '{param}': {message}", param=param, code="invalid_type") from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if isinstance(view, _Chat):
            return RequestBody(raw, route, stream=bool(view.stream), messages=_messages(view.messages))
        if isinstance(view, _Completion):
            _check_prompt(view.prompt)
            return RequestBody(raw, route, stream=bool(view.stream), prompt=view.prompt)
        return RequestBody(raw, route, stream=bool(view.stream))  # a gateway.wire shape: its walk reads ``top``


def _messages(sent: list[dict[str, msgspec.Raw]]) -> list[ChatMessage]:
    messages = []
    for i, fields in enumerate(sent):
        role = _typed(_role, _required(fields, "role", f"messages[{i}].role"), f"messages[{i}].role")
        content = _typed(_content, fields["content"], f"messages[{i}].content") if "content" in fields else None
        messages.append(ChatMessage(fields, role, content))
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
