"""The default RAG prompt templates of LangChain, LlamaIndex and Haystack, recognised by their wording.

LangChain's "stuff" chains render each document as its ``page_content`` and join them with ``"\\n\\n"``
(``DEFAULT_DOCUMENT_SEPARATOR``); LlamaIndex renders each node as its metadata lines (``file_path: /x/y.txt``),
a blank line and its text, and joins nodes with ``"\\n\\n"``. Inside a recognised template the context region is
known exactly; the documents within it are cut:

- at every ``\\n\\n`` that is followed by the first metadata key of the first node (LlamaIndex nodes with
  metadata: exact boundaries);
- otherwise at blank lines, gluing a heading or a line ending with ``:`` to what follows and never cutting
  inside fenced code. A paragraph whose first line is not indented exactly as the template indents its items
  (deeper: indented code; shallower: the second paragraph of a document that the template indented only on
  its first line), a table and a list continue the paragraph before them. A document that itself contains
  blank lines is then several blocks, one per paragraph, so such a group (``label`` ends in ``:paragraphs``) is
  only a candidate: :mod:`gateway.planning.intercept.boundaries` decides from traffic which of its blank lines
  are document boundaries.

An anchor matches with any whitespace where the template has whitespace (upstream has changed a trailing space
before). The LangChain v1 agent tool result (``Source: {metadata}\\nContent: {page_content}`` records joined by
``"\\n\\n"``, the shape of the v1 RAG agent tutorial) has exact boundaries too. The whole template region is
returned as well, so that other detectors do not mistake LlamaIndex's ``---------------------`` delimiters for
document separators. ``tests/integration/test_frameworks.py`` renders each template with the real libraries.

An application's own template, one this module does not know, is learned from its traffic: a text in no known
template and with no group of any other format is a candidate too (:func:`find_learned_candidate`, format
``learned``): its paragraphs after the first, which is the application's own (its instructions) and names the
slot its boundaries are learned in. Only blank lines that traffic confirms as boundaries between documents cut
it, and the paragraphs after the last of them (the question a template puts after its context, or a last
document that cannot be told from one) stay in place.

The template's own bytes around each item stay in place: where a template indents every document (Haystack's
``    {{ document.content }}``), that indentation is in the gaps, never in a block, so a moved document keeps
exactly one indentation wherever it lands. A document's own leading whitespace beyond the template's is its
content and moves with it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from gateway.planning.intercept.groups import Block, BlockGroup
from gateway.planning.intercept.lines import paragraphs, rstrip_end
from gateway.planning.intercept.regions import Spans

__all__ = ["LEARNED", "TEMPLATES", "Template", "find_learned_candidate", "find_template_groups"]


class Template(NamedTuple):
    """Where a known template's context starts and ends; ``probe`` is a cheap substring test for its family.

    The context starts after ``anchor`` (and then after ``opener`` if set) and ends at the last ``closer`` (or
    at the end of the text when ``closer`` is empty); with ``closer_before``, at the last ``closer`` before the
    last ``closer_before`` (a template whose query and earlier answer follow the context).
    """

    name: str
    format: str
    probe: str
    anchor: str
    opener: str
    closer: str
    closer_before: str = ""
    indent: str = ""
    """What the template writes before each document on its first line."""
    lead: str = ""
    """What the template writes before its context only (before the first document's first line)."""


# long, distinctive substrings make ``in`` skip through the text quickly
_LC_PROBE = "Use the following pieces of "
_HUB_PROBE = "based solely on the context below"
_LI_PROBE = "Context information "
_V1_PROBE = "Use the following context in your response:"
_REFINE_PROBE = "the original answer"
_HAYSTACK_PROBE = ", answer the question."
_BELOW_PROBE = "based on the below context:"
_CPC_PROBE = "Here are the relevant documents"
_LC_IDK = "If you don't know the answer, just say that you don't know, don't try to make up an answer."
_LC_RAG = "Use the following pieces of retrieved context to answer the question. If you don't know the answer, "
_LI_CLOSE = "\n---------------------\nGiven the "

TEMPLATES = (
    Template(
        "retrieval_qa",
        "langchain",
        _LC_PROBE,
        f"Use the following pieces of context to answer the question at the end. {_LC_IDK}\n\n",
        "",
        "\n\nQuestion:",
    ),
    Template(
        "retrieval_qa_chat",
        "langchain",
        _LC_PROBE,
        f"Use the following pieces of context to answer the user's question.\n{_LC_IDK}\n----------------\n",
        "",
        "",
    ),
    Template(
        "rag_prompt",
        "langchain",
        _LC_PROBE,
        f"{_LC_RAG}just say that you don't know. Use three sentences maximum and keep the answer concise.\nQuestion: ",
        "\nContext: ",
        " \nAnswer:",
    ),
    Template(
        "rag_system",
        "langchain",
        _LC_PROBE,
        f"{_LC_RAG}say that you don't know. Use three sentences maximum and keep the answer concise.\n\n",
        "",
        "",
    ),
    Template("rag_system_v1", "langchain", _V1_PROBE, f"{_V1_PROBE}\n\n", "", ""),
    Template(
        "retrieval_qa_chat_hub",
        "langchain",
        _HUB_PROBE,
        "Answer any use questions based solely on the context below:\n\n<context>\n",
        "",
        "\n</context>",
    ),
    Template(
        "text_qa",
        "llamaindex",
        _LI_PROBE,
        "Context information is below.\n---------------------\n",
        "",
        _LI_CLOSE,
    ),
    Template(
        "tree_summarize",
        "llamaindex",
        _LI_PROBE,
        "Context information from multiple sources is below.\n---------------------\n",
        "",
        _LI_CLOSE,
    ),
    Template(
        "refine",
        "llamaindex",
        _REFINE_PROBE,
        "Never reference the original answer or context directly in your answer.\n"
        "When in doubt, just repeat the original answer.\nNew Context: ",
        "",
        "\nQuery: ",
        "\nOriginal Answer: ",
    ),
    Template(
        "refine_completion",
        "llamaindex",
        _REFINE_PROBE,
        "We have the opportunity to refine the existing answer (only if needed) with some more context below.\n"
        "------------\n",
        "",
        "\n------------\nGiven the new context, refine the original answer",
    ),
    # Haystack ships no default RAG template: these are PromptBuilder's documented one and its first tutorial's
    Template(
        "haystack_rag",
        "haystack",
        _HAYSTACK_PROBE,
        "Given these documents, answer the question.\nDocuments:\n",
        "",
        "Question:",
        indent=" " * 8,
    ),
    Template(
        "haystack_tutorial",
        "haystack",
        _HAYSTACK_PROBE,
        "Given the following information, answer the question.\n\nContext:\n",
        "",
        "Question:",
        indent=" " * 4,
    ),
    # LangChain's conversational RAG tutorial (create_history_aware_retriever + create_retrieval_chain)
    Template(
        "qa_below_context",
        "langchain",
        _BELOW_PROBE,
        "Answer the user's questions based on the below context:\n\n",
        "",
        "",
    ),
    # LlamaIndex's condense_plus_context chat engine: its context prompt, first answer and refine
    Template(
        "condense_plus_context",
        "llamaindex",
        _CPC_PROBE,
        f"{_CPC_PROBE} for the context:\n\n",
        "",
        "Instruction: Based on the above documents",
        lead="  ",
    ),
    Template(
        "condense_plus_context_refine",
        "llamaindex",
        _CPC_PROBE,
        f"{_CPC_PROBE} for the context:\n\n",
        "",
        "Existing Answer:",
        lead="  ",
    ),
)
"""The recognised templates, in the order they are tried."""

_PROBES = (_LC_PROBE, _HUB_PROBE, _LI_PROBE, _V1_PROBE, _REFINE_PROBE, _HAYSTACK_PROBE, _BELOW_PROBE, _CPC_PROBE)
_ANCHORS = {
    template.name: re.compile(r"\s+".join(re.escape(word) for word in template.anchor.split()) + r"\s*")
    for template in TEMPLATES
}
_METADATA_KEY = re.compile(r"([A-Za-z_][\w .-]{0,40}): [^\n]*\n(?:[A-Za-z_][\w .-]{0,40}: [^\n]*\n)*[ \t]*\n")
_HEADING = re.compile(r"[ \t]*#{1,6}[ \t]")
_UNDERLINE = re.compile(r"[ \t]{0,3}([=\-~^*+#_])\1{2,}[ \t\r]*(?:\n|\Z)")
# a paragraph that continues the one before it: a table, a list item, an underline
_CONTINUES = re.compile(r"[ \t]*(?:\||(?:[-*+\u2022]|\d{1,3}[.)])[ \t]|([=\-~^*+#_])\1{2,}[ \t\r]*(?:\n|\Z))")
LEARNED = "learned"
"""The format of a candidate group in a template learned from traffic."""
_LEARNED_PARAGRAPHS = (3, 256)  # a candidate's paragraphs after the first: fewer cannot move, more is no context
_RECORD = re.compile(r"Source: [^\n]*\nContent: ")
_RECORD_NEXT = re.compile(r"\n\nSource: [^\n]*\nContent: ")


def _region(text: str, template: Template, start: int) -> tuple[int, int, int, int] | None:
    """Return ``(template_start, context_start, context_end, template_end)`` of the next use of ``template``."""
    anchor = _ANCHORS[template.name].search(text, start)
    if anchor is None:
        return None
    # the anchor matched any run of whitespace after its words, which may hold the first document's own
    # indentation: the context starts after the template's whitespace (and its lead), not after all of it
    trailing = len(template.anchor) - len(template.anchor.rstrip())
    begin = min(rstrip_end(text, anchor.start(), anchor.end()) + trailing, anchor.end())
    if template.lead and text.startswith(template.lead, begin):
        begin += len(template.lead)
    if template.opener:
        opener = text.find(template.opener, begin)
        if opener < 0:
            return None
        begin = opener + len(template.opener)
    if not template.closer:
        return anchor.start(), begin, len(text), len(text)
    limit = len(text)
    if template.closer_before:
        limit = text.rfind(template.closer_before, begin)
        if limit < 0:
            return None
    close = text.rfind(template.closer, begin, limit)
    if close < 0:
        return None
    return anchor.start(), begin, close, close + len(template.closer)


def _node_starts(text: str, start: int, end: int) -> list[int]:
    """Return the starts of LlamaIndex nodes rendered with metadata, or ``[]`` if the first one has none."""
    head = _METADATA_KEY.match(text, start, end)
    if head is None:
        return []
    marker = f"\n\n{head.group(1)}: "
    starts = [start]
    found = text.find(marker, start, end)
    while found >= 0:
        starts.append(found + 2)
        found = text.find(marker, found + 2, end)
    return starts


def _node_blocks(text: str, starts: list[int], end: int) -> list[tuple[int, int]]:
    bounds = [*starts[1:], end]
    return [(s, s + len(text[s:e].rstrip())) for s, e in zip(starts, bounds, strict=True)]


def _lead(text: str, line_start: int, end: int) -> str:
    stop = line_start
    while stop < end and text[stop] in " \t":
        stop += 1
    return text[line_start:stop]


def _paragraph_blocks(
    text: str, start: int, end: int, fences: Spans, indent: str
) -> tuple[list[tuple[int, int]], list[int]]:
    """One span per paragraph (a fenced code block whole), the template's indentation left out of the span,
    and the indices of the paragraphs that continue the one before them: a paragraph not indented exactly as
    the first document's first line (the template's indentation, plus, where the template indents, the
    documents' own: documentation text indented throughout), a table, a list, an underline, or what follows
    a lone heading or an introduction ending with ``:``. A continuation stays its own span (a paragraph's
    identity must not depend on its neighbour, which changes with the order) but is never cut from the
    paragraph before it."""
    blocks: list[tuple[int, int]] = []
    joined: list[int] = []
    glue = False
    if (start > 0 and text[start - 1] != "\n" and text.startswith(("```", "~~~"), start)) or any(
        s < start or e > end for s, e in fences.within(start, end)
    ):
        return [], []  # a fence opened mid-line, or one that crosses the context's edge: its code is not found
    item = indent  # how a document's first line is indented
    for para_start, para_end in paragraphs(text, start, end):
        lead = _lead(text, para_start, para_end)
        if not blocks:
            if not lead.startswith(indent):
                return [], []  # not rendered as this template renders: leave it alone
            # documentation text indented throughout: the template's indent plus the documents' own
            item = lead if indent else indent
        if blocks and fences.overlaps(blocks[-1][1], para_start):
            blocks[-1] = (blocks[-1][0], para_end)
        elif blocks and (glue or lead != item or _CONTINUES.match(text, para_start) is not None):
            joined.append(len(blocks))
            blocks.append((para_start, para_end))
        else:
            blocks.append((para_start + len(indent), para_end))
        # an introduction ("...:") or a lone heading belongs with the paragraph that follows it
        glue = text[para_end - 1] == ":" or _lone_heading(text, para_start, para_end)
    return blocks, joined


def _lone_heading(text: str, start: int, end: int) -> bool:
    """An ATX heading line, or a setext heading (one line and its underline), alone as a paragraph."""
    first = text.find("\n", start, end)
    if first < 0:
        return _HEADING.match(text, start) is not None
    return text.find("\n", first + 1, end) < 0 and _UNDERLINE.match(text, first + 1, end) is not None


def _source_records(text: str) -> BlockGroup | None:
    """A text made of ``Source: ...\\nContent: ...`` records (the v1 agent tool result), one block per record."""
    if _RECORD.match(text) is None:
        return None
    starts = [0, *(found.start() + 2 for found in _RECORD_NEXT.finditer(text))]
    if len(starts) < 2:
        return None
    blocks = tuple(Block(s, e, s, e) for s, e in _node_blocks(text, starts, len(text)))
    return BlockGroup("langchain", "agent_tool", blocks, None, blocks[-1].end)


def find_template_groups(text: str, fences: Spans) -> tuple[list[BlockGroup], list[tuple[int, int]]]:
    """Return the groups inside recognised templates and the spans of all recognised templates."""
    records = _source_records(text)
    if records is not None:
        return [records], [(0, len(text))]
    groups: list[BlockGroup] = []
    regions: list[tuple[int, int]] = []
    probes = {probe: probe in text for probe in _PROBES}
    for template in TEMPLATES:
        if not probes[template.probe]:
            continue
        search_from = 0
        while (found := _region(text, template, search_from)) is not None:
            template_start, begin, end, template_end = found
            regions.append((template_start, template_end))
            search_from = template_end if template_end > search_from else len(text)
            starts = _node_starts(text, begin, end)
            label = template.name
            joined: list[int] = []
            if starts:
                spans = _node_blocks(text, starts, end)
            else:
                spans, joined = _paragraph_blocks(text, begin, end, fences, template.indent)
                label = f"{template.name}:paragraphs"
            if len(spans) >= 2:
                blocks = tuple(Block(s, e, s, e) for s, e in spans)
                groups.append(BlockGroup(template.format, label, blocks, None, blocks[-1].end, tuple(joined)))
            if not template.closer:
                break
    return groups, regions


def find_learned_candidate(text: str, fences: Spans) -> BlockGroup | None:
    """The paragraphs after the first of a text that holds no group of a known format (``learned:paragraphs``),
    split as a template context is split (continuations joined, fenced code whole), or None when there are too
    few or too many of them to be a context."""
    found = paragraphs(text, 0, len(text))
    if next(found, None) is None or (second := next(found, None)) is None:
        return None
    spans, joined = _paragraph_blocks(text, second[0], len(text), fences, "")
    low, high = _LEARNED_PARAGRAPHS
    if not low <= len(spans) <= high:
        return None
    blocks = tuple(Block(s, e, s, e) for s, e in spans)
    return BlockGroup(LEARNED, f"{LEARNED}:paragraphs", blocks, None, blocks[-1].end, tuple(joined))
