"""The Python SDK for the index API (``/reorder``, ``/evict``, ...) and ``prefixgate reorder``.

Owns ``api`` (the client), ``wire`` (its errors and payloads) and ``batch`` (the chunked CLI). It may import
nothing of the server: a client program may install prefixgate and use this package alone.
"""

from gateway.client.api import IndexClient
from gateway.client.wire import IndexClientError

__all__ = ["IndexClient", "IndexClientError"]
