"""SGLang: the request id travels in the body field ``rid``; the response ``id`` echoes it.

A ``rid`` the client sent (ContextPilot's online flow sends the one ``/reorder`` issued) is the request's id
(``gateway.ids``): it is forwarded as the effective id, not replaced; a batch's list of rids is kept as sent.
"""

from __future__ import annotations

from engines.base import EngineAdapter

__all__ = ["SGLANG"]

SGLANG = EngineAdapter(name="sglang", body_id_field="rid")
