"""Format by format: what ``find_groups`` recognises, where blocks start and end, and what it leaves alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.planning.intercept import MAX_TEXT_CHARS, BlockGroup, find_groups, splice

PARIS = "Paris is the capital and most populous city of France."
BERLIN = "Berlin is the capital and largest city of Germany."
MADRID = "Madrid is the capital and most populous city of Spain."
ROME = "Rome is the capital city of Italy and of the Lazio region."


def renderings(text: str, group: BlockGroup) -> list[str]:
    return [block.render(text) for block in group.blocks]


def only(text: str, **options: str) -> BlockGroup:
    groups = find_groups(text, **options)
    assert len(groups) == 1, [(g.format, len(g)) for g in groups]
    return groups[0]


# ---------------------------------------------------------------------------------------------------- XML tags


def test_xml_keeps_attributes_and_positional_whitespace() -> None:
    text = (
        'Docs:\n<documents>\n  <document id="a" title="A &amp; B">'
        + PARIS
        + '</document>\n\n  <document id="b">'
        + BERLIN
        + "</document>\n</documents>\nQ?"
    )
    group = only(text)
    assert (group.format, group.label, group.number_base) == ("xml_tag", "document", None)
    assert renderings(text, group) == [
        f'<document id="a" title="A &amp; B">{PARIS}</document>',
        f'<document id="b">{BERLIN}</document>',
    ]
    assert group.gaps(text) == ["\n\n  "]
    assert group.blocks[0].content(text) == PARIS
    assert splice(text, group, [1, 0]) == (
        f'Docs:\n<documents>\n  <document id="b">{BERLIN}</document>\n\n'
        f'  <document id="a" title="A &amp; B">{PARIS}</document>\n</documents>\nQ?'
    )
    assert group.after == text.index("</documents>") + len("</documents>")


def test_xml_every_group_in_the_text_is_found() -> None:
    text = (
        f"<documents><document>{PARIS}</document><document>{BERLIN}</document></documents>\n"
        f"between\n<docs><doc>{MADRID}</doc>\n<doc>{ROME}</doc>\n<doc>x</doc></docs>"
    )
    groups = find_groups(text)
    assert [(g.label, len(g)) for g in groups] == [("document", 2), ("doc", 3)]


@pytest.mark.parametrize("tag", ["doc", "context", "passage", "source", "file", "search_result", "result", "chunk"])
def test_xml_item_tags_without_wrapper(tag: str) -> None:
    text = f"Intro.\n<{tag} k='1'>{PARIS}</{tag}>\n<{tag}>{BERLIN}</{tag}>\nOutro."
    group = only(text)
    assert group.label == tag
    assert group.preamble(text) == "Intro.\n"
    assert group.tail(text) == "\nOutro."


def test_xml_anthropic_index_attributes_are_position_numbers() -> None:
    text = "".join(
        f'<document index="{i + 1}"><source>s{i}</source><document_content>{body}</document_content></document>\n'
        for i, body in enumerate([PARIS, BERLIN, MADRID])
    )
    group = only(text)
    assert group.number_base == 1
    out = splice(text, group, [2, 0, 1])
    assert out.startswith(f'<document index="1"><source>s2</source><document_content>{MADRID}')
    assert f'<document index="3"><source>s1</source><document_content>{BERLIN}' in out
    assert group.blocks[2].key(text).startswith('<document index=""><source>s2</source>')


def test_xml_id_attributes_are_kept_and_non_consecutive_index_is_an_identifier() -> None:
    text = f'<doc id="1">{PARIS}</doc>\n<doc id="2">{BERLIN}</doc>'
    assert only(text).number_base is None
    text = f'<doc index="4">{PARIS}</doc>\n<doc index="9">{BERLIN}</doc>'
    group = only(text)
    assert group.number_base is None
    assert splice(text, group, [1, 0]) == f'<doc index="9">{BERLIN}</doc>\n<doc index="4">{PARIS}</doc>'


def test_xml_context_wrapper_is_descended_into() -> None:
    text = f"<context>\n<document>{PARIS}</document>\n<document>{BERLIN}</document>\n</context>"
    group = only(text)
    assert group.label == "document"
    assert group.after == len(text)


@pytest.mark.parametrize(
    "text",
    [
        f"<documents><document>{PARIS}</document></documents>",
        f"<doc>{PARIS}</doc> and then <doc>{BERLIN}</doc>",
        f"<example>{PARIS}</example>\n<example>{BERLIN}</example>",
        '<video><source src="a.webm"><source src="b.mp4"></video>',
        f"<doc/>\n<doc/>\n<doc>{PARIS}",
        f"```xml\n<doc>{PARIS}</doc>\n<doc>{BERLIN}</doc>\n```",
    ],
)
def test_xml_non_groups(text: str) -> None:
    assert find_groups(text) == []


def test_xml_item_content_may_hold_unbalanced_fences_and_markers() -> None:
    first = "Install:\n```bash\npip install x\n```\nThen:\n```python\nclient = X()\n"
    second = "[1] a line that looks like a numbered source item\n[2] and another one that also does"
    text = f"<doc>{first}</doc>\n<doc>{second}</doc>\n<doc>{PARIS}</doc>"
    assert [(g.format, len(g)) for g in find_groups(text)] == [("xml_tag", 3)]


def test_xml_crossing_tags_do_not_break_detection() -> None:
    text = f"<doc><source>x</doc></source>\n<doc>{PARIS}</doc>\n<doc>{BERLIN}</doc>"
    group = only(text)
    assert renderings(text, group) == [f"<doc>{PARIS}</doc>", f"<doc>{BERLIN}</doc>"]


def test_xml_explicit_tag() -> None:
    text = f"<item>{PARIS}</item>\n<item>{BERLIN}</item>"
    assert find_groups(text) == []
    assert only(text, mode="xml_tag", tag="item").label == "item"
    with pytest.raises(ValueError, match="invalid tag"):
        find_groups(text, mode="xml_tag", tag="bad tag")


# ---------------------------------------------------------------------------------------------------- numbered


def test_numbered_brackets_renumbered_by_position() -> None:
    text = f"Sources:\n[1] {PARIS}\n[2] {BERLIN}\n[3] {MADRID}\n\nQuestion: which?"
    group = only(text)
    assert (group.format, group.label, group.number_base) == ("numbered", "[#]", 1)
    assert group.tail(text) == "\n\nQuestion: which?"
    assert splice(text, group, [2, 0, 1]) == (f"Sources:\n[1] {MADRID}\n[2] {PARIS}\n[3] {BERLIN}\n\nQuestion: which?")
    assert [block.content(text) for block in group.blocks] == [PARIS, BERLIN, MADRID]
    assert group.blocks[0].key(text) == f"[] {PARIS}"


@pytest.mark.parametrize(
    ("marker", "label"),
    [
        ("Document {}: ", "Document #"),
        ("Doc {}: ", "Doc #"),
        ("Source [{}]: ", "Source [#]"),
        ("Source {}: ", "Source #"),
        ("Passage {} (Cities): ", "Passage #"),
        ("[Doc {}] ", "[Doc #]"),
        ("Result {} - ", "Result #"),
    ],
)
def test_numbered_labelled_markers(marker: str, label: str) -> None:
    text = "\n".join(marker.format(i + 1) + body for i, body in enumerate([PARIS, BERLIN, MADRID])) + "\n\nAnswer."
    group = only(text)
    assert group.label == label
    assert group.tail(text) == "\n\nAnswer."
    assert splice(text, group, [1, 2, 0]).startswith(marker.format(1) + BERLIN)


def test_numbered_keeps_the_start_offset() -> None:
    text = f"[6] {PARIS}\n[7] {BERLIN}\n[8] {MADRID}"
    group = only(text)
    assert group.number_base == 6
    assert splice(text, group, [2, 1, 0]) == f"[6] {MADRID}\n[7] {BERLIN}\n[8] {PARIS}"


def test_numbered_never_splits_prose_citations() -> None:
    text = "As [1] and [2] show, and as [3] confirms, caching works. See [4] for the details of the method."
    assert find_groups(text) == []


@pytest.mark.parametrize(
    ("text", "last"),
    [
        (f"[1] {PARIS}\n[2] {BERLIN}\n\nAnswer the question.", BERLIN),
        (f"[1] {PARIS}\n[2] {BERLIN}\n[3] {MADRID}\nWhat is the capital of Spain?", MADRID),
        (f"[1] {PARIS}\n[2] {BERLIN}\nQuestion: which one?", BERLIN),
        (f"Document 1:\n{PARIS}\n{ROME}\nDocument 2:\n{BERLIN}\n{MADRID}\nQuestion: which?", MADRID),
        (f"Document 1:\n{PARIS}\n\n{ROME}\n\nDocument 2:\n{BERLIN}\n\n{MADRID}\n\nAnswer briefly.", MADRID),
        (f"[1] {PARIS}\n\n[2] {BERLIN}\n\nUsing the sources, answer.", BERLIN),
    ],
)
def test_numbered_last_item_never_swallows_trailing_instructions(text: str, last: str) -> None:
    group = only(text)
    assert text[: group.end].endswith(last)


def test_numbered_ambiguous_last_item_is_left_out_of_the_group() -> None:
    text = (
        f"Document 1:\n{PARIS}\n{ROME}\nDocument 2:\n{BERLIN}\n{MADRID}\n"
        f"Document 3:\n{ROME}\n{PARIS}\n{BERLIN}\nsomething that may or may not belong to it"
    )
    group = only(text)
    assert len(group) == 2
    assert group.tail(text).startswith("\nDocument 3:")
    assert "\nDocument 3:\n" in splice(text, group, [1, 0])


def test_numbered_lines_shaped_like_boundaries_inside_documents_are_content() -> None:
    text = (
        "Document 1:\n# Refunds\nCustomers can get refunds.\n## Details\nWithin 30 days.\n\n"
        "Document 2:\n# Passwords\nReset via email.\n## Details\nThe link is valid for an hour.\n\nQuestion: x"
    )
    group = only(text)
    assert text[: group.end].endswith("The link is valid for an hour.")


def test_numbered_instruction_like_paragraph_within_the_shape_is_ambiguous() -> None:
    first = f"Document 1:\n{PARIS}\n\n{ROME}"
    second = f"Document 2:\n{BERLIN}\n\n{MADRID}"
    assert len(only(f"{first}\n\n{second}\n\nAnswer the question.")) == 2
    # "Please note ..." could be the document's own second paragraph or an instruction: leave it alone
    assert find_groups(f"{first}\n\nDocument 2:\n{BERLIN}\n\nPlease note this.") == []


@pytest.mark.parametrize(
    "text",
    [
        "Rules:\n1. Answer only from the provided context and never from guesses.\n"
        "2. Cite the document identifier after each sentence that uses it please.",
        "Follow these steps to analyze the documents:\n1. Read each of the documents carefully and note claims.\n"
        "2. Compare the claims across the documents and list every contradiction.",
        "Which city is the capital of France?\n[1] Paris\n[2] Lyon\n[3] Marseille",
        f"[1] {PARIS}\n[2] {BERLIN}\n[5] {MADRID}\n[3] {ROME}",
        f"[01] {PARIS}\n[02] {BERLIN}",
        f"```\n[1] {PARIS}\n[2] {BERLIN}\n```",
        f"Paris [1], Berlin [2] and Madrid [3] are capitals.\n\n[1] {PARIS}\n[2] {BERLIN}\n[3] {MADRID}",
        f"Intro text.\n\nReferences\n[1] {PARIS}\n[2] {BERLIN}",
    ],
)
def test_numbered_non_groups(text: str) -> None:
    assert find_groups(text) == []


def test_numbered_dotted_items_need_an_introduction_in_auto_mode() -> None:
    items = f"1. {PARIS} It is large.\n2. {BERLIN} It is large too."
    assert find_groups(items) == []
    assert only(f"Here are the search results:\n{items}").label == "#."
    assert only(items, mode="numbered").number_base == 1


def test_numbered_example_citations_in_instructions_are_allowed() -> None:
    text = f"Cite sources as [1] or [2].\n\nSources:\n[1] {PARIS}\n[2] {BERLIN}"
    assert len(only(text)) == 2


def test_numbered_outer_list_beats_inner_list() -> None:
    text = (
        "Document 1:\nTo deploy the service:\n1. Build the image with make image today.\n"
        "2. Push it to the registry and apply the manifest.\n\n"
        f"Document 2:\n{PARIS}\n\nQuestion: how?"
    )
    group = only(text)
    assert group.label == "Document #"


# ---------------------------------------------------------------------------------------------------- markdown


def test_markdown_document_headers_with_numbers() -> None:
    text = f"## Document 1\n\n{PARIS}\n\n## Document 2\n\n{BERLIN}\n\nAnswer the question."
    group = only(text)
    assert (group.format, group.label, group.number_base) == ("markdown_header", "##", 1)
    assert splice(text, group, [1, 0]) == (
        f"## Document 1\n\n{BERLIN}\n\n## Document 2\n\n{PARIS}\n\nAnswer the question."
    )


def test_markdown_subsections_belong_to_their_section() -> None:
    text = (
        f"## Document 1\n{PARIS}\n\n### Details\n{ROME}\n\n## Document 2\n{BERLIN}\n\n### Details\n{MADRID}\n\nAnswer."
    )
    group = only(text)
    assert text[: group.end].endswith(MADRID)
    assert group.tail(text) == "\n\nAnswer."


def test_markdown_source_headers_end_at_a_section_header() -> None:
    text = f"### Source: a\n{PARIS}\n\n### Source: b\n{BERLIN}\n\n### Question\nWhich?"
    group = only(text)
    assert group.number_base is None
    assert group.tail(text) == "\n\n### Question\nWhich?"


@pytest.mark.parametrize(
    "text",
    [
        "# Guide\n\n## Install\n\nRun pip install.\n\n## Configure\n\nEdit the file.",
        "## Document storage\n\nBuckets.\n\n## Document retrieval\n\nSigned URLs.",
        "```\n## Document 1\ntext\n## Document 2\ntext\n```",
    ],
)
def test_markdown_non_groups(text: str) -> None:
    assert find_groups(text) == []


def test_markdown_explicit_mode_takes_ordinary_sections() -> None:
    text = "# Guide\n\n## Install\n\nRun pip install.\n\n## Configure\n\nEdit the file."
    group = only(text, mode="markdown_header")
    assert group.label == "##"
    assert group.tail(text) == ""


# ---------------------------------------------------------------------------------------------------- separators


def test_separator_docs_after_an_introduction() -> None:
    text = f"Context:\n\n{PARIS}\n---\n{BERLIN}\n---\n{MADRID}\n\nQuestion: which?"
    group = only(text)
    assert (group.format, group.label) == ("separator", "---")
    assert group.gaps(text) == ["\n---\n", "\n---\n"]
    assert splice(text, group, [2, 1, 0]) == f"Context:\n\n{MADRID}\n---\n{BERLIN}\n---\n{PARIS}\n\nQuestion: which?"


@pytest.mark.parametrize(
    "text",
    [
        f"{PARIS}\n---\n{BERLIN}\n---\n{MADRID}\n---\n{ROME}",
        f"Context:\n\n{PARIS}\n---\n{BERLIN}",
        "---\ntitle: x\n---\n# Doc\n\nSome text that is long enough.\n\n---\n\nMore text that is long enough.",
        "| a | b |\n|---|---|\n| 1 | 2 |",
    ],
)
def test_separator_non_groups(text: str) -> None:
    assert find_groups(text) == []


def test_separator_explicit_mode_and_custom_separator() -> None:
    assert len(only(f"{PARIS}\n---\n{BERLIN}", mode="separator")) == 2
    group = only(f"{PARIS}\n~~ cut ~~\n{BERLIN}", mode="separator", separator="~~ cut ~~")
    assert group.label == "~~ cut ~~"


# ---------------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("indent", [None, 2, "\t"])
def test_json_results_splice_is_byte_exact_and_valid(indent: int | str | None) -> None:
    payload: dict[str, Any] = {
        "query": "capitals [1] {x}",
        "results": [
            {"url": "a", "text": PARIS + ' with "quotes" and \\ backslash ]'},
            {"url": "b", "text": BERLIN, "meta": {"tags": ["x", "y"], "score": 0.5}},
            {"url": "c", "text": "東京 \u2028 é"},
        ],
        "total": 3,
    }
    text = json.dumps(payload, indent=indent)
    group = only(text)
    assert (group.format, group.label, group.after) == ("json_results", "results", None)
    out = splice(text, group, [2, 0, 1])
    reordered = json.loads(out)
    assert reordered["results"] == [payload["results"][i] for i in (2, 0, 1)]
    assert {**reordered, "results": None} == {**payload, "results": None}
    assert sorted(out) == sorted(text)
    assert splice(out, only(out), [1, 2, 0]) == text


def test_json_each_result_key_is_a_group() -> None:
    text = json.dumps({"sources": [{"u": 1}, {"u": 2}], "documents": [{"d": 1}, {"d": 2}, {"d": 3}]})
    assert [(g.label, len(g)) for g in find_groups(text)] == [("sources", 2), ("documents", 3)]


@pytest.mark.parametrize(
    "text",
    [
        '{"results": [{"a": 1}], "n": 1}',
        '{"results": [1, 2, 3]}',
        '{"results": [{"a": 1}, 2]}',
        '{"items": [{"a": 1}, {"a": 2}]}',
        '{"results": [{"a": 1}, {"a": 2}], "results": [{"a": 3}, {"a": 4}]}',
        '{"results": [{"a": 1}, {"a": 2}]',
        '{"results": [{"a": 1}, {"a": 2}]} trailing',
        '{"outer": {"results": [{"a": 1}, {"a": 2}]}}',
        '[{"a": 1}, {"a": 2}]',
        "{" * 100_000,
        "[" * 100_000,
    ],
)
def test_json_non_groups(text: str) -> None:
    assert find_groups(text) == []


def test_json_top_level_array_in_explicit_mode() -> None:
    text = '[{"a": 1},\n {"a": 2}]'
    group = only(text, mode="json_results")
    assert splice(text, group, [1, 0]) == '[{"a": 2},\n {"a": 1}]'


# ---------------------------------------------------------------------------------------------------- templates

LC_QA = (
    "Use the following pieces of context to answer the question at the end. If you don't know the answer, "
    "just say that you don't know, don't try to make up an answer.\n\n"
)
LI_QA = "Context information is below.\n---------------------\n"
LI_END = (
    "\n---------------------\nGiven the context information and not prior knowledge, answer the query.\n"
    "Query: which?\nAnswer: "
)


def test_langchain_retrieval_qa() -> None:
    text = f"{LC_QA}{PARIS}\n\n{BERLIN}\n\n{MADRID}\n\nQuestion: which?\nHelpful Answer:"
    group = only(text)
    assert (group.format, group.label) == ("langchain", "retrieval_qa:paragraphs")
    assert renderings(text, group) == [PARIS, BERLIN, MADRID]
    assert group.tail(text) == "\n\nQuestion: which?\nHelpful Answer:"


def test_langchain_paragraph_split_keeps_headings_introductions_and_code_together() -> None:
    code = "Example:\n```python\nx = 1\n\ny = 2\n```"
    text = f"{LC_QA}## Title\n\n{PARIS}\n\n{code}\n\nQuestion: which?\nHelpful Answer:"
    group = only(text)
    # a paragraph each (its identity must not depend on its neighbour), the heading's never cut from it
    assert renderings(text, group) == ["## Title", PARIS, code]
    assert group.joined == (1,)
    table = "| city | country |\n|------|---------|\n| Paris | France |"
    text = f"{LC_QA}{PARIS}\n\n    print(paris)\n\n{table}\n\n{ROME}\n\nQuestion: which?\nHelpful Answer:"
    group = only(text)
    assert renderings(text, group) == [PARIS, "    print(paris)", table, ROME]
    assert group.joined == (1, 2)  # indented code and a table continue the paragraph before them


def test_llamaindex_nodes_with_metadata_have_exact_boundaries() -> None:
    nodes = f"file_path: /a.txt\n\n{PARIS}\n\n{ROME}\n\nfile_path: /b.txt\n\n{BERLIN}"
    text = f"{LI_QA}{nodes}{LI_END}"
    group = only(text)
    assert (group.format, group.label) == ("llamaindex", "text_qa")
    assert renderings(text, group) == [f"file_path: /a.txt\n\n{PARIS}\n\n{ROME}", f"file_path: /b.txt\n\n{BERLIN}"]


def test_llamaindex_single_node_is_not_a_separator_group() -> None:
    text = f"{LI_QA}file_path: /a.txt\n\n{PARIS}{LI_END}"
    assert find_groups(text) == []


def test_template_context_with_numbered_items_is_numbered() -> None:
    text = f"{LC_QA}[1] {PARIS}\n\n[2] {BERLIN}\n\nQuestion: which?\nHelpful Answer:"
    assert only(text).format == "numbered"


# ---------------------------------------------------------------------------------------------------- modes


def test_modes_and_limits() -> None:
    text = f"<doc>{PARIS}</doc>\n<doc>{BERLIN}</doc>"
    assert find_groups(text, mode="numbered") == []
    assert len(only(text, mode="xml_tag")) == 2
    with pytest.raises(ValueError, match="unknown mode"):
        find_groups(text, mode="everything")
    assert find_groups("") == []
    assert find_groups(text + " " * MAX_TEXT_CHARS) == []
