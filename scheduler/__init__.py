"""Pure, synchronous scheduling: block identity, live prefix index, online and batch plans, dedup."""

__all__: list[str] = []
