"""Planning: what to do with one request's text, and the per-replica index views it plans against.

Owns ``intercept`` (scan a text, detect block groups, meaning rules, splice), ``texts`` and ``units`` (the texts
and whole blocks of one request), ``control`` (the per-request control headers), ``planner`` (the memo and the
order asked of the live index), ``plan`` (what was decided), ``outcome`` (what the result header and metrics
say), ``citemap`` (opt-in citation mapping) and ``residency`` (one replica's live index and conversation
tracker). May import the base modules, ``wire``, ``scheduler`` and ``engines``; never the proxy, the upstream
side or the edge.
"""

__all__: list[str] = []
