"""Tests against the real vLLM and SGLang cache classes; they run in the engines venv (see conftest.py)."""
