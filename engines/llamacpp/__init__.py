"""llama.cpp (`llama-server`): request stamping, cached-token parsing and slot residency (`slots`).

Building the binary and writing the tiny test model are test tooling (`tests/builds/`), not part of the product.
"""

__all__: list[str] = []
