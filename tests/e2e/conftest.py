"""Fixtures shared by the end-to-end tests (real sockets, real llama-server)."""

from tests.e2e.llama import llama_binary, llama_server, start_llama_server, tiny_model  # noqa: F401
