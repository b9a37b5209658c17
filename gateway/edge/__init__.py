"""The HTTP edge: the HTTP/1.1 server side of client connections, request limits, reading bodies, auth.

Owns ``server`` (the uvicorn protocol with the edge limits), ``inbound`` (the one normalised spelling of a request
path, reading a request body within its limits) and ``access`` (the one auth check: client keys, admin token). May
import the base modules (``gateway.errors``, ``gateway.ids``, ``gateway.settings``, ...) and nothing else of the
gateway.
"""

__all__: list[str] = []
