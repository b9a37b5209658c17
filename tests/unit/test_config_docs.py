"""docs/configuration.md lists every setting with its flag, variable and default, exactly as the code has them.

Regenerate the table with ``.venv/bin/python -m tests.unit.test_config_docs``.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from gateway.settings import ENV_PREFIX, OPTIONS, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
BEGIN, END = "<!-- settings table: begin -->", "<!-- settings table: end -->"


def settings_table() -> str:
    """One table per option group, in declaration order, from the declarations in ``gateway.settings``."""
    defaults = msgspec.structs.asdict(Settings())
    sections: dict[str, list[str]] = {}
    for name, (meaning, kind, group) in OPTIONS.items():
        rows = sections.setdefault(group, ["| flag | environment variable | default | meaning |", "|---|---|---|---|"])
        flag = f"--{name.replace('_', '-')}"
        if kind == "bool":
            flag += f" / --no-{name.replace('_', '-')}"
        default = defaults[name]
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "(empty)" if default == "" else str(default).lower() if isinstance(default, bool) else default
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | `{shown}` | {meaning} |")
    return "\n\n".join(f"### {group.capitalize()}\n\n" + "\n".join(rows) for group, rows in sections.items())


def test_configuration_reference_matches_the_settings() -> None:
    text = DOC.read_text()
    generated = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert generated == settings_table(), "docs/configuration.md is stale: run python -m tests.unit.test_config_docs"


def test_every_hook_variable_is_documented() -> None:
    import re

    from engines import hooks

    source = "".join(path.read_text() for path in (DOC.parents[1] / "engines" / "hooks").glob("*.py"))
    read = set(re.findall(r"\"(PREFIXGATE_HOOK_[A-Z0-9_]+)\"", source)) | {*hooks.INDEX_URL_VARS, hooks.TOKEN_VAR}
    text = DOC.read_text()
    table = text[text.index("<!-- hook variables: begin -->") : text.index("<!-- hook variables: end -->")]
    assert set(re.findall(r"^\| `(\w+)`", table, flags=re.MULTILINE)) == read


if __name__ == "__main__":
    text = DOC.read_text()
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    DOC.write_text(f"{head}\n{settings_table()}\n{tail}")
