"""Per-request planning options: the ``X-Prefixgate-*`` headers (or ContextPilot's ``X-ContextPilot-*``).

Ours are validated (a 400 names the header); ContextPilot's are read leniently, as ContextPilot does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import InvalidRequest
from gateway.planning.intercept import MODES
from gateway.settings import Settings

__all__ = ["Control", "parse_control"]

_SCOPES = {
    "all": frozenset({"system", "user", "tool", "completions"}),
    "system": frozenset({"system"}),
    "user": frozenset({"user"}),
    "tool": frozenset({"tool"}),
    "tools": frozenset({"tool"}),
    "tool_results": frozenset({"tool"}),
    "completions": frozenset({"completions"}),
}
_OFF = {"0", "false", "no", "off", "disabled"}
_ON = {"1", "true", "yes", "on", "enabled"}


@dataclass(frozen=True, slots=True)
class Control:
    """Per-request options: headers ``X-Prefixgate-*`` (or ContextPilot's ``X-ContextPilot-*``) over defaults."""

    enabled: bool
    mode: str = "auto"
    tag: str | None = None
    separator: str | None = None
    scope: frozenset[str] = _SCOPES["all"]
    annotate: bool = False
    mapping: bool = False  # citation mapping: renumber cite-by-number groups, map the answer back

    def signature(self) -> bytes:
        return f"{self.mode}|{self.tag}|{self.separator}|{int(self.annotate)}|{int(self.mapping)}".encode()


def _flag(value: str, header: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _ON:
        return True
    if lowered in _OFF:
        return False
    raise InvalidRequest(f"header {header} must be on or off, got {value!r}", param=header, code="invalid_header")


def parse_control(headers: Mapping[str, str], settings: Settings) -> Control:
    """Read the control headers. Ours are validated (400 on nonsense); ContextPilot's are lenient, as there."""
    enabled = settings.reorder
    if (value := headers.get("x-contextpilot-enabled")) is not None:
        enabled = value.strip().lower() not in {"false", "0", "no"}
    if (value := headers.get("x-prefixgate-reorder")) is not None:
        enabled = _flag(value, "X-Prefixgate-Reorder")
    mode = "auto"
    if (value := headers.get("x-contextpilot-mode")) is not None and value.strip() in MODES:
        mode = value.strip()
    if (value := headers.get("x-prefixgate-format")) is not None:
        if value.strip() not in MODES:
            raise InvalidRequest(
                f"header X-Prefixgate-Format must be one of {sorted(MODES)}", param="X-Prefixgate-Format"
            )
        mode = value.strip()
    scope = _SCOPES[settings.reorder_scope]
    if (value := headers.get("x-contextpilot-scope")) is not None:
        scope = _SCOPES.get(value.strip().lower(), _SCOPES["all"])
    if (value := headers.get("x-prefixgate-scope")) is not None:
        parts = [part.strip().lower() for part in value.split(",") if part.strip()]
        if not parts or any(part not in _SCOPES for part in parts):
            raise InvalidRequest(
                f"header X-Prefixgate-Scope takes a comma list of {sorted(_SCOPES)}", param="X-Prefixgate-Scope"
            )
        scope = frozenset().union(*(_SCOPES[part] for part in parts))
    annotate = settings.relevance_annotation
    if (value := headers.get("x-prefixgate-annotate")) is not None:
        annotate = _flag(value, "X-Prefixgate-Annotate")
    mapping = settings.citation_mapping
    if (value := headers.get("x-prefixgate-citation-mapping")) is not None:
        mapping = _flag(value, "X-Prefixgate-Citation-Mapping")
    tag = headers.get("x-prefixgate-tag") or headers.get("x-contextpilot-tag")
    separator = headers.get("x-prefixgate-separator") or headers.get("x-contextpilot-separator")
    return Control(enabled, mode, tag, separator, scope, annotate, mapping)
