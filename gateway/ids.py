"""Gateway request ids: honour a valid client ``X-Request-Id``, otherwise mint ``req-<32 hex>``."""

from __future__ import annotations

import re
import uuid

__all__ = ["REQUEST_ID_PATTERN", "mint_request_id", "resolve_request_id"]

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def mint_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def resolve_request_id(client_value: str | None) -> str:
    """The id for this request: the client's when it is well-formed, a fresh one otherwise."""
    if client_value and REQUEST_ID_PATTERN.fullmatch(client_value):
        return client_value
    return mint_request_id()
