"""What the gateway needs to know about an engine kind: how to stamp ids and read cached tokens."""

from __future__ import annotations

from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EngineAdapter", "cached_tokens_from_usage", "prompt_tokens_from_usage"]


def _usage(payload: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``usage`` object of an answer or stream event: top level (chat, completions, Anthropic ``message_delta``),
    or inside ``response`` (Responses ``response.completed``) or ``message`` (Anthropic ``message_start``)."""
    usage = payload.get("usage")
    if isinstance(usage, Mapping):
        return usage
    for wrapper in ("response", "message"):
        inner = payload.get(wrapper)
        if isinstance(inner, Mapping) and isinstance(inner.get("usage"), Mapping):
            nested: Mapping[str, Any] = inner["usage"]
            return nested
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cached_tokens_from_usage(payload: Mapping[str, Any]) -> int | None:
    """Engine-reported cached prompt tokens in a response or stream event, if it carries any.

    Reads OpenAI's ``usage.prompt_tokens_details.cached_tokens`` (SGLang with ``--enable-cache-report``,
    vLLM with ``--enable-prompt-tokens-details``, llama-server always), the Responses API's
    ``usage.input_tokens_details.cached_tokens``, Anthropic's ``usage.cache_read_input_tokens``, else llama.cpp's
    ``timings.cache_n``.
    """
    usage = _usage(payload)
    if usage is not None:
        for details_name in ("prompt_tokens_details", "input_tokens_details"):
            details = usage.get(details_name)
            if isinstance(details, Mapping) and (value := _count(details.get("cached_tokens"))) is not None:
                return value
        if (value := _count(usage.get("cache_read_input_tokens"))) is not None:
            return value
    timings = payload.get("timings")
    if isinstance(timings, Mapping):
        return _count(timings.get("cache_n"))
    return None


def prompt_tokens_from_usage(payload: Mapping[str, Any]) -> int | None:
    """Engine-reported prompt tokens: ``usage.prompt_tokens`` (chat, completions), ``usage.input_tokens``
    (Responses), or Anthropic's uncached ``input_tokens`` plus ``cache_read_input_tokens`` and
    ``cache_creation_input_tokens``; else llama.cpp's ``timings``, ``prompt_n`` (computed) plus ``cache_n`` (reused),
    which its last streamed chunk carries even when the client did not ask for ``stream_options.include_usage``
    (measured on llama-server: ``prompt_n + cache_n == usage.prompt_tokens``)."""
    usage = _usage(payload)
    if usage is None:
        timings = payload.get("timings")
        if isinstance(timings, Mapping):
            computed, reused = _count(timings.get("prompt_n")), _count(timings.get("cache_n"))
            if computed is not None and reused is not None:
                return computed + reused
        return None
    if (value := _count(usage.get("prompt_tokens"))) is not None:
        return value
    uncached = _count(usage.get("input_tokens"))
    cache_read = _count(usage.get("cache_read_input_tokens"))
    if uncached is None or cache_read is None:
        return uncached
    return uncached + cache_read + (_count(usage.get("cache_creation_input_tokens")) or 0)


@dataclass(frozen=True, slots=True)
class EngineAdapter:
    """How one engine kind understands request ids.

    ``body_id_field`` names the body field the engine takes the request id from (SGLang: ``rid``);
    every engine also receives the ``X-Request-Id`` header (vLLM and generic servers read it).
    ``reuse_overwrites``: the engine holds a prompt once, and a request that reuses its head overwrites the rest
    (llama.cpp: a slot holds one prompt; its host-RAM cache hands a prompt back to a slot, keeping no copy).
    """

    name: str
    body_id_field: str | None = None
    reuse_overwrites: bool = False

    def stamp_fields(
        self,
        request_id: str,
        sent: Collection[str] = (),
        kept: Collection[str] = (),
        route: str = "/v1/chat/completions",
    ) -> dict[str, str]:
        """Body fields to set so the engine files the request under ``request_id``.

        ``sent`` names the id fields the client sent as strings (``rid``, ``request_id``): they are set to the
        effective id too, so the engine never sees an id other than the one the client gets back. ``kept`` names
        id fields the client sent in another shape (SGLang's list of rids for a batch): they stay as sent.
        On ``/v1/responses`` vLLM and SGLang take the id from the body field ``request_id`` (their default is a
        fresh ``resp_...``); elsewhere SGLang takes ``rid`` and vLLM the ``X-Request-Id`` header.
        """
        fields = dict.fromkeys(sent, request_id)
        field = "request_id" if route == "/v1/responses" and self.name in ("vllm", "sglang") else self.body_id_field
        if field and field not in kept:
            fields[field] = request_id
        return fields

    def stamp_headers(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id}

    def kv_event_fields(self, request_id: str, sent: Container[str]) -> dict[str, Any]:
        """Body fields that make the engine's ``BlockStored`` events name this request (``session_id``).

        A ``session_id`` the client chose is kept (its requests are then not attributed); vLLM also gets
        ``vllm_xargs.kv_cache_report_mode = "full"`` (re-announce reused prefix blocks) unless the client sent
        ``vllm_xargs`` itself. ``sent``: the top-level fields of the client's body.
        """
        fields: dict[str, Any] = {}
        if "session_id" not in sent:
            fields["session_id"] = request_id
        if self.name == "vllm" and "vllm_xargs" not in sent:
            fields["vllm_xargs"] = {"kv_cache_report_mode": "full"}
        return fields
