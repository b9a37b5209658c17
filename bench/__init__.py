"""Benchmarks that print tables (not collected by pytest).

``python -m bench`` runs every registered benchmark, ``python -m bench NAME [NAME ...]`` runs some; other
arguments (e.g. ``--quick``) are passed to each. A benchmark is a module with ``main(argv: list[str]) -> None``;
register it in :data:`BENCHMARKS` (module paths, imported only when run).
"""

__all__ = ["BENCHMARKS"]

BENCHMARKS: dict[str, str] = {
    "scheduler": "bench.scheduler_bench",
    "compare": "bench.compare_bench",
    "proxy": "bench.proxy_bench",
    "path": "bench.path_bench",
    "intercept": "bench.intercept_bench",
    "llama": "bench.llama_bench",
    "soak": "bench.soak_bench",
    "replicas": "bench.replicas_bench",
    "apps": "bench.apps_bench",
    "peers": "bench.peers_bench",
}
