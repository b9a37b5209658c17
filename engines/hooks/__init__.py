"""Code that runs inside engine processes (stdlib only)."""

__all__: list[str] = []
