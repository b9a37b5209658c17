"""Prompt interception at the text level: find groups of retrieved blocks in a text and splice them back in a
new order, byte-exact otherwise.

No HTTP and no scheduling here: the caller picks the texts (system prompt, user message, tool result,
completion prompt), asks the scheduler for an order per group, and splices. Typical use::

    groups = find_groups(text)
    keys = [group.keys(text) for group in groups]           # hash these for the scheduler
    text = splice_all(text, [(g, plan(k)) for g, k in zip(groups, keys)])

:func:`audit_rewrite` checks, from the documents alone, that a rewritten text is the sent one with whole
documents permuted. See :mod:`gateway.planning.intercept.groups` for the span conventions and
:mod:`gateway.planning.intercept.detect` for the formats and the order in which they are tried.
"""

from gateway.planning.intercept.audit import Audit, Mangled, audit_rewrite
from gateway.planning.intercept.budget import BudgetExceeded, deadline_in
from gateway.planning.intercept.detect import MAX_TEXT_CHARS, find_groups
from gateway.planning.intercept.groups import FORMATS, MODES, Block, BlockGroup, NumberSpan
from gateway.planning.intercept.splice import relevance_line, splice, splice_all

__all__ = [
    "FORMATS",
    "MAX_TEXT_CHARS",
    "MODES",
    "Audit",
    "Block",
    "BlockGroup",
    "BudgetExceeded",
    "Mangled",
    "NumberSpan",
    "audit_rewrite",
    "deadline_in",
    "find_groups",
    "relevance_line",
    "splice",
    "splice_all",
]
