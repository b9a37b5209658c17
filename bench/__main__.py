"""``python -m bench [NAME ...] [options]``: run registered benchmarks (all when no name is given).

Leading arguments name benchmarks; everything from the first option on is passed to each benchmark's ``main``.
"""

from __future__ import annotations

import importlib
import sys

from bench import BENCHMARKS


def main(argv: list[str]) -> int:
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, options = argv[:split], argv[split:]
    if not names and options in (["-h"], ["--help"]):
        print(f"usage: python -m bench [{' | '.join(BENCHMARKS)} ...] [options passed to each]")
        return 0
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or list(BENCHMARKS):
        print(f"== bench {name} ==", flush=True)
        if importlib.import_module(BENCHMARKS[name]).main(options):  # a nonzero code: a target failed or an error
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
