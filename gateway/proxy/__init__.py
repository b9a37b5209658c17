"""The proxy pipeline: one exchange per proxied request, from the decoded body to the settled answer.

Owns ``pipeline`` (admit, decode, plan, send, relay, settle), ``relay`` (streaming the answer back) and
``usage`` (reading the engine's usage from answers). May import every layer below it: the base modules,
``wire``, ``edge``, ``planning`` and ``upstream``.
"""

__all__: list[str] = []
