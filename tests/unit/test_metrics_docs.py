"""docs/metrics.md lists every metric the gateway exports, with its type, labels and help, as the code has them.

Regenerate the table with ``.venv/bin/python -m tests.unit.test_metrics_docs``.
"""

from __future__ import annotations

from pathlib import Path

from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.settings import load_settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
BEGIN, END = "<!-- metrics table: begin -->", "<!-- metrics table: end -->"
_SUFFIX = {"counter": "_total", "histogram": "_bucket, _sum, _count", "gauge": ""}


def metrics_table() -> str:
    metrics: Metrics = create_app(load_settings(environ={})).state.metrics
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    families = sorted(metrics.registry.collect(), key=lambda family: family.name)
    for family in families:
        labels = sorted({key for sample in family.samples for key in sample.labels if key not in ("le",)})
        declared = getattr(metrics.registry, "_names_to_collectors", {}).get(family.name)
        labels = labels or list(getattr(declared, "_labelnames", ()) or getattr(family, "_labelnames", ()))
        name = f"`{family.name}{_SUFFIX.get(family.type, '')}`"
        rows.append(f"| {name} | {family.type} | {', '.join(labels) or '-'} | {family.documentation} |")
    return "\n".join(rows)


def test_metrics_reference_matches_the_registry() -> None:
    text = DOC.read_text()
    generated = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert generated == metrics_table(), "docs/metrics.md is stale: run python -m tests.unit.test_metrics_docs"


if __name__ == "__main__":
    text = DOC.read_text()
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    DOC.write_text(f"{head}\n{metrics_table()}\n{tail}")
