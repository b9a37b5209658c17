"""The eviction hook against the real engines (run in the engines venv) and against the real gateway.

prefixgate's own venv has no torch, vLLM or SGLang. ``tests/enginehooks`` holds the tests that drive the real
``BlockPool``/``KVCacheManager``, ``RadixCache`` and ``UnifiedRadixCache`` (both TreeCores, and the host tier);
this test runs them with the engines venv's interpreter and fails with their output if any fails.
``make test`` builds the venv first (``make engines-venv``: about 80 s, 2.4 GB, cached under
``~/.cache/prefixgate`` by the hash of ``tests/enginehooks/engines-venv.lock``) and passes its path in
``PREFIXGATE_ENGINES_VENV``. The test skips only when neither exists.

The last test closes the loop on the other side: the hook's sender posts engine-mangled ids to a real
prefixgate on a real socket, with the admin token, and the gateway's live index forgets those requests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from engines.hooks import EvictionReporter, vllm_external_id
from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.servers import serve_in_thread
from tests.enginehooks.enginesvenv import ENV_VAR, find_engines_venv

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hooks_against_the_real_engine_classes() -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("running inside the engines venv: tests/enginehooks is collected directly")
    venv = find_engines_venv()
    if venv is None:
        pytest.skip(f"engines venv not built and {ENV_VAR} unset: run `make engines-venv` (about 80 s, 2.4 GB)")
    python = venv / "bin" / "python"
    assert python.exists(), f"{ENV_VAR} names {venv}, which has no bin/python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFIXGATE_", "CONTEXTPILOT_", "PYTEST_"))}
    started = time.monotonic()
    result = subprocess.run(
        [str(python), "-m", "pytest", "tests/enginehooks", "-q", "-p", "no:cacheprovider", "-ra"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=840,
    )
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    print(f"engines venv {venv}: {summary[0]} ({time.monotonic() - started:.0f} s)")
    assert result.returncode == 0, result.stdout[-12_000:] + "\n" + result.stderr[-4_000:]
    assert " passed" in summary[0] and "skipped" not in summary[0], summary[0]


def test_the_gateway_forgets_what_the_hook_reports() -> None:
    settings = load_settings(environ={}, upstream="http://127.0.0.1:9", admin_token="adm1n")
    auth = {"Authorization": "Bearer adm1n"}
    with serve_in_thread(create_app(settings)) as base:
        planned = httpx.post(f"{base}/reorder", json={"contexts": [[1, 2, 3], [1, 2, 4]]}, headers=auth).json()
        ids = planned["request_ids"]

        def index_size() -> int:
            stats: int = httpx.get(f"{base}/stats", headers=auth).json()["index_stats"]["num_requests"]
            return stats

        assert index_size() == 2
        sender = EvictionReporter(base, token="adm1n")
        try:
            # what the hook sends for a vLLM chat request: the OpenAI prefix stays, vLLM's suffix is stripped
            sender.report([vllm_external_id(f"chatcmpl-{ids[0]}-0123abcd"), ids[1]])
            assert sender.flush(10)
        finally:
            sender.close()
        assert sender.stats["sent"] == 2 and sender.stats["rejected"] == 0
        assert index_size() == 0
