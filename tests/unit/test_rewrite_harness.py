"""Metamorphic harness: whatever order the planner picks, a rewrite only permutes whole documents.

Prompts come from the real framework templates (``tests/frameworks.py`` renders LangChain, LlamaIndex and
Haystack prompts with the libraries) and from generated templates (numbered sources, ``Document N:``,
markdown sections, XML tags, separators) over documents shaped like real ones: indented code, tables,
markdown, setext underlines, numbered and bulleted lists, fenced code, paragraphs repeated across documents.
Templates no detector knows are learned from a stream of requests (a head, documents, a question with a fixed
lead-in, a line that changes with every request before the documents). Each request goes the planner's way,
detect → learned boundaries → meaning → splice, with a *random*
permutation of every group standing in for the plan; every output is audited against the documents the
prompt was built from (:func:`gateway.planning.intercept.audit.audit_rewrite`): the same documents, each
byte-identical, permuted; the template's bytes in place; labels renumbered only where the meaning rules allow
it, kept with their documents where a message refers to them, and nothing moved where the order means
something.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.planning.intercept import BlockGroup, audit_rewrite, find_groups, splice_all
from gateway.planning.intercept.audit import LabelRule
from gateway.planning.intercept.boundaries import Boundaries
from gateway.planning.intercept.meaning import decide_request
from tests.frameworks import CASES, Case, quiet

_WORDS = ["cache", "prefix", "engine", "token", "replica", "router", "index", "block", "slot", "query", "json",
          "encoder", "decoder", "stream", "buffer", "policy", "refund", "invoice", "export", "archive"]  # fmt: skip
_SHARED = [
    "If skipkeys is true, dict keys that are not of a basic type are skipped instead of raising a TypeError.",
    "See the conversion table for how Python objects map to JSON values and back.",
    "Changed in version 3.6: all optional parameters are now keyword-only.",
]


@st.composite
def _prose(draw: st.DrawFn, tag: str) -> str:
    words = draw(st.lists(st.sampled_from(_WORDS), min_size=6, max_size=18))
    lines = draw(st.integers(1, 2))
    text = f"{tag.capitalize()} {' '.join(words)}."
    if lines == 2:
        text += f"\n{' '.join(reversed(words))} {tag}."
    return text


def _code(tag: str) -> str:
    return f"    {tag}.dump(obj, fp)\n    {tag}.load(fp)"


def _table(tag: str) -> str:
    return f"| name | value |\n|------|-------|\n| {tag} | 1 |\n| other | 2 |"


def _underlined(tag: str) -> str:
    title = f"The {tag} module"
    return f"{title}\n{'=' * len(title)}"


def _numbered_list(tag: str) -> str:
    return f"1. Open the {tag} file for writing.\n2. Call dump with the {tag} object.\n3. Close the file."


def _bullets(tag: str) -> str:
    return f"- {tag} keeps its order\n- {tag} keeps its bytes"


def _fence(tag: str) -> str:
    return f"```python\n{tag} = load()\n\nprint({tag})\n```"


def _subheading(tag: str) -> str:
    return f"### {tag} details\nThe {tag} details follow here."


_SHAPES = [_code, _table, _underlined, _numbered_list, _bullets, _fence, _subheading]


@st.composite
def documents(draw: st.DrawFn, count: int) -> list[str]:
    """``count`` documents, each with a unique prose paragraph; repeated paragraphs never sit side by side."""
    docs = []
    for n in range(count):
        tag = f"doc{n}x{draw(st.integers(0, 999))}"
        paragraphs = [draw(_prose(tag))]
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.integers(0, len(_SHAPES) + 1))
            if kind < len(_SHAPES):
                paragraphs.append(_SHAPES[kind](tag))
            elif kind == len(_SHAPES) and paragraphs[-1] not in _SHARED:
                paragraphs.append(draw(st.sampled_from(_SHARED)))
            else:
                paragraphs.append(draw(_prose(tag + "b")))
        if draw(st.booleans()):
            paragraphs.insert(0, _underlined(tag)) if draw(st.booleans()) else None
        if draw(st.integers(0, 4)) == 0 and paragraphs[-1] not in _SHARED and paragraphs[0] not in _SHARED:
            paragraphs = [paragraphs[-1], *paragraphs[:-1]]  # a document that opens with code or a table
        docs.append("\n\n".join(paragraphs))
    return docs


@st.composite
def windows(draw: st.DrawFn, count: int) -> list[str]:
    """``count`` chunks of one long text, cut as a text splitter with an overlap does: each window opens with the
    previous one's last one or two paragraphs and keeps at least one of its own (a window made only of shared
    paragraphs is the documented blind spot of learned boundaries)."""
    overlap = draw(st.integers(1, 2))
    sizes = draw(st.lists(st.integers(2 * overlap + 1, 2 * overlap + 2), min_size=count, max_size=count))
    paragraphs = []
    for n in range(sum(sizes)):
        tag = f"w{n}x{draw(st.integers(0, 999))}"
        shape = _SHAPES[kind] if (kind := draw(st.integers(0, len(_SHAPES) * 2))) < len(_SHAPES) else None
        # a fence holds a blank line, where a splitter could cut it: the windows here are whole paragraphs
        paragraphs.append(shape(tag) if shape not in (None, _fence) else draw(_prose(tag)))
    chunks, at = [], 0
    for size in sizes:
        chunks.append("\n\n".join(paragraphs[at : at + size]))
        at += size - overlap
    return chunks


@st.composite
def headed(draw: st.DrawFn, count: int) -> list[str]:
    """``count`` chunks of two or three files, each opening with a line that names its file (as a splitter that
    repeats a document's title in every chunk writes it): every chunk of a file shares its first paragraph."""
    files = [f"From the f{n}x{draw(st.integers(0, 999))} handbook:" for n in range(draw(st.integers(2, 3)))]
    chunks = []
    for n in range(count):
        body = [draw(_prose(f"h{n}x{draw(st.integers(0, 999))}")) for _ in range(draw(st.integers(1, 3)))]
        chunks.append("\n\n".join([draw(st.sampled_from(files)), *body]))
    return chunks


def _rule(tail: str) -> tuple[LabelRule, bool]:
    """The oracle for labels, from the prompt's own words: kept when referenced, nothing moved when ranked."""
    if "ranked by relevance" in tail:
        return "any", False
    if "[2]" in tail or "Document 2" in tail or "cite" in tail:
        return "attached", True
    return "any", True


def _rewrite(
    data: st.DataObject, texts: Sequence[str], boundaries: Boundaries
) -> tuple[list[str], list[list[BlockGroup]]]:
    """The planner's path with a random plan: every text's groups, the request's decisions, spliced."""
    groups = {i: boundaries.regroup(text, find_groups(text, learn=True)) for i, text in enumerate(texts)}
    decisions = decide_request(dict(enumerate(texts)), groups)
    out = []
    for i, text in enumerate(texts):
        edits = []
        for group, decision in zip(groups[i], decisions.get(i, []), strict=True):
            order = list(range(len(group)))
            if decision.moves:
                order = data.draw(st.permutations(order), label="plan")
            edits.append((group, order, decision.renumbers))
        out.append(splice_all(text, edits) if edits else text)
    return out, [groups[i] for i in range(len(texts))]


_ITEMS = {
    "brackets": ("Sources:\n", lambda i, doc: f"[{i}] {doc}", "\n"),
    "brackets_blank": ("Sources:\n\n", lambda i, doc: f"[{i}] {doc}", "\n\n"),
    "document": ("Here are the retrieved documents:\n\n", lambda i, doc: f"Document {i}:\n{doc}", "\n\n"),
    "source": ("Context:\n", lambda i, doc: f"Source {i}: {doc}", "\n\n"),
    "markdown": ("# Retrieved\n\n", lambda i, doc: f"## Document {i}\n{doc}", "\n\n"),
    "xml": ("<documents>\n", lambda i, doc: f'<document index="{i}">\n{doc}\n</document>', "\n"),
    "xml_indented": ("<documents>\n", lambda i, doc: f"  <doc>\n{doc}\n  </doc>", "\n"),
    "separator": ("Here are the retrieved documents:\n\n", lambda i, doc: doc, "\n\n---\n\n"),
    "bullets": ("Context:\n", lambda i, doc: f"- {doc}", "\n"),
}
_TAILS = [
    "\n\nQuestion: How do I write JSON to a file?",
    "\n\nAnswer the question using only the documents above.",
    "",
    "\n\nWhat does [2] say about the encoder?",
    "\n\nSummarize Document 2 only.",
    "\n\nCite the sources you use as [n].",
    "\n\nThe documents are ranked by relevance.\nQuestion: which one helps?",
]


def _custom(kind: str, docs: Sequence[str], tail: str, system: str) -> str:
    intro, item, joiner = _ITEMS[kind]
    body = joiner.join(item(i, doc) for i, doc in enumerate(docs, 1))
    close = "\n</documents>" if intro.startswith("<documents>") else ""
    return f"{system}{intro}{body}{close}{tail}"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    kind=st.sampled_from(sorted(_ITEMS)),
    tail=st.sampled_from(_TAILS),
    system=st.sampled_from(["", "You are a helpful assistant. Be brief.\n\n"]),
    count=st.integers(2, 5),
)
def test_generated_templates_only_permute_whole_documents(
    data: st.DataObject, kind: str, tail: str, system: str, count: int
) -> None:
    docs = data.draw(documents(count), label="documents")
    sent = _custom(kind, docs, tail, system)
    (forwarded,), _ = _rewrite(data, [sent], Boundaries())
    rule, may_move = _rule(tail)
    audit = audit_rewrite(sent, forwarded, docs, labels=rule)
    if not may_move:
        assert not audit.moved


_HEADS = ["You are the support assistant of ACME. Answer from the excerpts below.\n\n", "Reference material:\n\n"]
_QUESTIONS = [
    "",
    "\n\nUsing only the reference material above, answer: how do I write {q} to a file?",
    "\n\nQuestion: {q}?",
    "\n\nThe excerpts are ranked by relevance.\nQuestion: which one covers {q}?",
    "\n\nWhat does the first excerpt say about {q}?",
]


def _learned_prompt(head: str, dated: bool, docs: Sequence[str], tail: str, n: int) -> str:
    day = f"Today is day {n} of the trial.\n\n" if dated else ""
    return f"{head}{day}" + "\n\n".join(docs) + tail.format(q=f"topic {n}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), head=st.sampled_from(_HEADS), tail=st.sampled_from(_QUESTIONS), dated=st.booleans())
def test_learned_templates_only_permute_whole_documents(data: st.DataObject, head: str, tail: str, dated: bool) -> None:
    """A template no detector knows, learned from a stream of requests over one pool: every output audited (the
    head, the changing line and the question stay in place; nothing moves where the order means something)."""
    pool = data.draw(documents(6), label="pool")
    boundaries = Boundaries()
    may_move = "ranked" not in tail and "first" not in tail
    for n in range(data.draw(st.integers(4, 12), label="requests")):
        picked = data.draw(st.permutations(pool), label="order")[: data.draw(st.integers(2, 5), label="count")]
        sent = _learned_prompt(head, dated, picked, tail, n)
        (forwarded,), _ = _rewrite(data, [sent], boundaries)
        audit = audit_rewrite(sent, forwarded, picked)
        if not may_move:
            assert not audit.moved


def test_learned_templates_are_not_vacuous() -> None:
    """The same path with a fixed pool and seeded plans: documents in an unknown template do move, once learned."""
    rng = random.Random(5)
    pool = [f"Doc {n} paragraph one about the cache.\n\nDoc {n} paragraph two about the index." for n in range(6)]
    for head, tail in ((_HEADS[0], _QUESTIONS[0]), (_HEADS[1], _QUESTIONS[1])):
        boundaries, moved = Boundaries(), 0
        for n in range(30):
            picked = rng.sample(pool, 4)
            sent = _learned_prompt(head, True, picked, tail, n)
            groups = boundaries.regroup(sent, find_groups(sent, learn=True))
            edits = [(group, rng.sample(range(len(group)), len(group))) for group in groups]
            moved += audit_rewrite(sent, splice_all(sent, edits), picked).moved
        assert moved >= 5, head


def _texts(body: dict[str, Any]) -> list[str]:
    if "prompt" in body:
        prompt = body["prompt"]
        return [prompt if isinstance(prompt, str) else prompt[0]]
    return [m["content"] for m in body["messages"] if isinstance(m.get("content"), str)]


def _slot(i: int) -> str:
    return f"\x02slot{i}\x03"


@functools.cache
def _rendered(case: Case, count: int) -> tuple[str, ...]:
    """The texts of the request the library renders for ``count`` documents, each document a placeholder.

    Rendered once per case and size (the libraries take tens of milliseconds a call); a request is the
    placeholders replaced by its documents, which is what the libraries do with ``page_content``/``text``.
    """
    with quiet():
        return tuple(_texts(case.render([_slot(i) for i in range(count)], "How do I write JSON to a file?")))


def _items(case: Case, docs: Sequence[str]) -> list[str]:
    """The retrieved items as the template renders them: the agent tool's ``Source:`` line is the item's own."""
    if case.label != "agent_tool":
        return list(docs)
    return [f"Source: {{'source': 'https://example.org/kb/{i}'}}\nContent: {doc}" for i, doc in enumerate(docs)]


@pytest.mark.parametrize("case", CASES, ids=repr)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_framework_prompts_only_permute_whole_documents(case: Case, data: st.DataObject) -> None:
    """A stream of requests over one pool of documents, so that boundaries are learned; every output audited."""
    pool = data.draw(st.one_of(documents(5), windows(5), headed(5)), label="pool")
    boundaries = Boundaries()
    for _ in range(data.draw(st.integers(4, 10), label="requests")):
        picked = data.draw(st.permutations(pool), label="order")[: data.draw(st.integers(2, 4), label="count")]
        texts = list(_rendered(case, len(picked)))
        holder = next(i for i, text in enumerate(texts) if _slot(0) in text)
        for i, doc in enumerate(picked):
            texts[holder] = texts[holder].replace(_slot(i), doc)
        out, _ = _rewrite(data, texts, boundaries)
        for j, (sent, forwarded) in enumerate(zip(texts, out, strict=True)):
            audit_rewrite(sent, forwarded, _items(case, picked) if j == holder else [])


def test_the_harness_is_not_vacuous() -> None:
    """The same path with a fixed pool and seeded plans: documents of every template family do move."""
    rng = random.Random(1)
    pool = [f"Doc {n} paragraph one about the cache.\n\nDoc {n} paragraph two about the index." for n in range(5)]
    for case in CASES:
        boundaries, moved = Boundaries(), 0
        for _ in range(25):
            picked = rng.sample(pool, 3)
            texts = list(_rendered(case, len(picked)))
            holder = next(i for i, text in enumerate(texts) if _slot(0) in text)
            for i, doc in enumerate(picked):
                texts[holder] = texts[holder].replace(_slot(i), doc)
            groups = [boundaries.regroup(text, find_groups(text)) for text in texts]
            sent = texts[holder]
            edits = [(group, rng.sample(range(len(group)), len(group))) for group in groups[holder]]
            moved += audit_rewrite(sent, splice_all(sent, edits), _items(case, picked)).moved
        assert moved >= 5, case


def test_haystack_finds_indented_documentation_text() -> None:
    """Documentation indented throughout (signatures at three spaces, text at six, examples deeper) in
    Haystack's tutorial template: a document starts only where a line is indented as the first document's
    first line is, so the documents are found, learned and moved whole, each keeping its own indentation."""
    (case,) = [case for case in CASES if case.label == "haystack_tutorial:paragraphs"]
    pool = [
        f"   json.{name}(obj)\n\n      {name} serializes or parses JSON, variant {n}.\n\n         >>> json.{name}(x)"
        for n, name in enumerate(["dumps", "loads", "dump", "load", "encoder", "decoder"])
    ]
    rng = random.Random(3)
    boundaries, moved = Boundaries(), 0
    for _ in range(25):
        picked = rng.sample(pool, 3)
        (text,) = _rendered(case, len(picked))
        for i, doc in enumerate(picked):
            text = text.replace(_slot(i), doc)
        (group,) = find_groups(text)
        assert [i for i in range(len(group)) if i not in group.joined] == [0, 3, 6]  # the documents' first lines
        edits = [(g, rng.sample(range(len(g)), len(g))) for g in boundaries.regroup(text, [group])]
        moved += audit_rewrite(text, splice_all(text, edits), picked).moved
    assert moved >= 5


def test_an_underline_is_not_a_separator() -> None:
    """Found by the harness: two headings underlined alike (``=====``) in ``---``-separated documents made a
    separator chain of their own that won over the ``---`` one, and documents were cut under their headings."""
    prose = "cache cache cache cache cache cache."
    code = [f"    doc{n}x0.dump(obj, fp)\n    doc{n}x0.load(fp)" for n in range(5)]
    docs = [
        f"Doc0x0 {prose}",
        f"The doc1x0 module\n=================\n\nDoc1x0 {prose}",
        f"{code[2]}\n\nDoc2x0 {prose}\n\n{code[2]}",
        f"The doc3x0 module\n=================\n\nDoc3x0 {prose}\n\n{code[3]}\n\n{code[3]}\n\n{code[3]}",
        f"{code[4]}\n\nDoc4x0 {prose}",
    ]
    sent = _custom("separator", docs, "\n\nQuestion: How do I write JSON to a file?", "")
    (group,) = find_groups(sent)
    assert group.label == "---"
    for order in ([1, 0, 2, 3], [3, 2, 1, 0]):
        assert audit_rewrite(sent, splice_all(sent, [(group, order)]), docs).order == (*order, 4)
