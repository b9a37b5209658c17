"""Code that runs inside engine processes (stdlib only): the eviction hook for vLLM and SGLang.

``engines.hooks.hook`` is the whole hook in one file (it is also what a standalone install copies);
``engines.hooks.install`` implements ``prefixgate install-hook``. Nothing is imported here, so that the
``.pth`` line costs nothing in processes that are not engines.
"""

__all__: list[str] = []
