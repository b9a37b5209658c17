"""What the gateway needs to know about an engine kind: how to stamp ids and read cached tokens."""

from __future__ import annotations

from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EngineAdapter", "cached_tokens_from_usage", "prompt_tokens_from_usage"]


def cached_tokens_from_usage(payload: Mapping[str, Any]) -> int | None:
    """Engine-reported cached prompt tokens in a response or stream chunk, if it carries any.

    Reads OpenAI's ``usage.prompt_tokens_details.cached_tokens`` (SGLang with ``--enable-cache-report``,
    vLLM with ``--enable-prompt-tokens-details``, llama-server always), else llama.cpp's ``timings.cache_n``.
    """
    usage = payload.get("usage")
    if isinstance(usage, Mapping):
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping):
            value = details.get("cached_tokens")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    timings = payload.get("timings")
    if isinstance(timings, Mapping):
        value = timings.get("cache_n")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def prompt_tokens_from_usage(payload: Mapping[str, Any]) -> int | None:
    """Engine-reported prompt tokens (``usage.prompt_tokens``), if the payload carries them."""
    usage = payload.get("usage")
    value = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class EngineAdapter:
    """How one engine kind understands request ids.

    ``body_id_field`` names the body field the engine takes the request id from (SGLang: ``rid``);
    every engine also receives the ``X-Request-Id`` header (vLLM and generic servers read it).
    """

    name: str
    body_id_field: str | None = None

    def stamp_fields(self, request_id: str, sent: Collection[str] = (), kept: Collection[str] = ()) -> dict[str, str]:
        """Body fields to set so the engine files the request under ``request_id``.

        ``sent`` names the id fields the client sent as strings (``rid``, ``request_id``): they are set to the
        effective id too, so the engine never sees an id other than the one the client gets back. ``kept`` names
        id fields the client sent in another shape (SGLang's list of rids for a batch): they stay as sent.
        """
        fields = dict.fromkeys(sent, request_id)
        if self.body_id_field and self.body_id_field not in kept:
            fields[self.body_id_field] = request_id
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
