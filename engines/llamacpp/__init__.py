"""llama.cpp (`llama-server`): building the binary for tests and writing the tiny test model.

The engine adapter (request stamping, cached-token parsing, `/slots` residency) lives next to
`build.py` and `tinymodel.py`; those two are developer tooling and are not imported from here so that
importing the adapter never pulls in `gguf`, `numpy` or `subprocess` machinery.
"""

__all__: list[str] = []
