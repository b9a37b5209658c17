"""The standalone hook, activated by its ``.pth`` in a fresh interpreter, patches the real engines on import.

Each test runs a child Python in the engines venv that processes the installed ``prefixgate_hook.pth`` with
``site.addsitedir`` (exactly what interpreter start-up does for site-packages), only then imports the
engines, drives a real cache into evicting, and lets the hook's sender deliver to a real local HTTP server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engines.hooks.install import install_standalone
from tests.enginehooks.collector import collector

REPO = Path(__file__).resolve().parents[2]

_PRELUDE = """
import logging, site, sys, warnings
warnings.simplefilter("ignore")
site.addsitedir(sys.argv[1])
assert "prefixgate_hook" in sys.modules, "the .pth did not activate the hook"
assert not any(m.startswith(("vllm", "sglang")) for m in sys.modules), "engines imported too early"
from tests.enginehooks import stubs
stubs.install()
import prefixgate_hook
"""

_VLLM_AND_SGLANG = """
from tests.enginehooks.realcaches import make_vllm, make_sglang
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
v = make_vllm(8)
v.run("chatcmpl-req-v-0123abcd", list(range(8)))
v.allocate(v.pool.get_num_free_blocks())
s = make_sglang("unified")
s.run("req-s", [1, 2, 3, 4])
s.cache.evict(EvictParams(num_tokens=4))
assert prefixgate_hook.active().flush(10), prefixgate_hook.active().stats
print("stats", prefixgate_hook.active().stats)
"""

_SGLANG_BACKEND = """
from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
from tests.enginehooks.realcaches import SglangSetup, make_sglang
assert "prefixgate" in registry.registered_radix_cache_backends()
assert "__prefixgate_hook__" not in vars(UnifiedRadixCache) and "__prefixgate_hook__" not in vars(RadixCache)
base = make_sglang("unified")
args = ServerArgs(model_path="dummy", page_size=1, radix_cache_backend="prefixgate")
set_global_server_args_for_scheduler(args)
ctx = registry.TreeCacheBuildContext(
    server_args=args, params=base.params, is_hybrid_swa=False, is_hybrid_ssm=False,
    enable_hierarchical_cache=False, disable_radix_cache=False, tp_worker=None, model_config=None,
    tp_size=1, tp_rank=0, tp_group=None,
)
cache = registry.create_tree_cache(ctx)  # what the scheduler calls
assert isinstance(cache, UnifiedRadixCache) and "__prefixgate_hook__" in vars(cache)
s = SglangSetup(cache, base.req_to_token, base.allocator, base.params)
s.run("req-backend", [5, 6, 7])
cache.evict(EvictParams(num_tokens=3))
assert prefixgate_hook.active().flush(10), prefixgate_hook.active().stats
"""


def _run_child(
    site_dir: Path, body: str, env_extra: dict[str, str], *, prelude: bool = True, root: Path = REPO
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFIXGATE_", "CONTEXTPILOT_", "VLLM_PLUGINS"))}
    env.update(env_extra, PYTHONPATH=str(root))
    script = (textwrap.dedent(_PRELUDE) if prelude else "") + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, str(site_dir)],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_pth_activates_and_reports_real_evictions(tmp_path: Path) -> None:
    install_standalone(tmp_path)
    with collector("/gw") as gateway:
        child = _run_child(
            tmp_path,
            _VLLM_AND_SGLANG,
            {"CONTEXTPILOT_INDEX_URL": gateway.url, "PREFIXGATE_ADMIN_TOKEN": "s3cret"},
        )
        assert child.returncode == 0, child.stdout + child.stderr
        assert sorted(gateway.ids) == ["chatcmpl-req-v", "req-s"]
        assert {r.path for r in gateway.received} == {"/gw/evict"}
        assert {r.authorization for r in gateway.received} == {"Bearer s3cret"}
    # the log lines an operator looks for
    assert "patched vllm.v1.core.block_pool (vllm 0.33.0)" in child.stderr
    assert "patched sglang.srt.mem_cache.unified_radix_cache (sglang 0.5.23)" in child.stderr


@pytest.mark.slow
def test_sglang_backend_mode_instruments_only_the_cache_it_builds(tmp_path: Path) -> None:
    install_standalone(tmp_path)
    with collector() as gateway:
        child = _run_child(
            tmp_path,
            _SGLANG_BACKEND,
            {"PREFIXGATE_INDEX_URL": gateway.url, "PREFIXGATE_HOOK_SGLANG": "backend"},
        )
        assert child.returncode == 0, child.stdout + child.stderr
        assert gateway.ids == ["req-backend"]
    assert "radix-cache backend 'prefixgate' instrumented UnifiedRadixCache" in child.stderr


_VLLM_PLUGIN = """
import logging, site, sys, warnings
warnings.simplefilter("ignore")
site.addsitedir(sys.argv[1])
assert "prefixgate_hook" not in sys.modules, "no .pth was installed, yet the hook is loaded"
from tests.enginehooks import stubs
stubs.install()
from tests.enginehooks.realcaches import make_vllm  # the cache modules are imported before the plugins load
from vllm.plugins import load_general_plugins
load_general_plugins()  # what every vLLM process does before it starts work
import prefixgate_hook
assert prefixgate_hook.active() is not None, "the vllm.general_plugins entry point did not activate the hook"
v = make_vllm(8)
v.run("chatcmpl-req-plugin-0123abcd", list(range(8)))
v.allocate(v.pool.get_num_free_blocks())
assert prefixgate_hook.active().flush(10), prefixgate_hook.active().stats
"""


@pytest.mark.slow
def test_vllm_plugin_entry_point_alone_reports_real_evictions(tmp_path: Path) -> None:
    """vLLM's official plugin mechanism, without the .pth: the hook arrives through ``load_general_plugins``."""
    site_dir, root = tmp_path / "site", tmp_path / "root"
    install_standalone(site_dir, pth=False)
    assert not (site_dir / "prefixgate_hook.pth").exists()
    # Only the tests on the path, not the checkout: its prefixgate.egg-info declares the same plugin name.
    root.mkdir()
    (root / "tests").symlink_to(REPO / "tests")
    with collector() as gateway:
        env = {"PREFIXGATE_INDEX_URL": gateway.url}
        child = _run_child(site_dir, _VLLM_PLUGIN, env, prelude=False, root=root)
        assert child.returncode == 0, child.stdout + child.stderr
        assert gateway.ids == ["chatcmpl-req-plugin"]
    assert "patched vllm.v1.core.block_pool (vllm 0.33.0)" in child.stderr
