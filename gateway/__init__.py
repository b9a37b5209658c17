"""prefixgate's server, one folder per layer (top to bottom; each imports only the ones below it).

- ``app``, ``cli``: the composition root (settings in, a running app out).
- ``proxy``: one exchange per proxied request (admit, decode, plan, send, relay, settle).
- ``indexapi``: ContextPilot's index API.
- ``state``: index changes shared with other gateways (Redis).
- ``upstream``: transport, replicas, health, the choice of replica.
- ``planning``: scan, detect, meaning, plan, splice; the per-replica index views.
- ``edge``: the HTTP/1.1 server side, limits, auth.
- ``wire``: the three APIs' wire views.
- base modules: ``errors``, ``ids``, ``metrics``, ``logs``, ``settings``, ``background``.
- ``client``: the Python SDK, which imports nothing of the server.

``tests/unit/test_layering.py`` enforces the order.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
