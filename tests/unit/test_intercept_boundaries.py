"""Learned document boundaries in template contexts: a chunk is never split; confirmed boundaries are cut."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.planning.intercept import BlockGroup, audit_rewrite, find_groups, splice_all
from gateway.planning.intercept.boundaries import Boundaries

QA = (
    "Use the following pieces of context to answer the question at the end. If you don't know the answer, "
    "just say that you don't know, don't try to make up an answer.\n\n"
)


def prompt(chunks: list[str], question: str = "which?") -> str:
    context = "\n\n".join(chunks)
    return f"{QA}{context}\n\nQuestion: {question}\nHelpful Answer:"


def learned(boundaries: Boundaries, text: str) -> list[BlockGroup]:
    return boundaries.regroup(text, find_groups(text, "template", learn=True))


def renderings(text: str, group: BlockGroup) -> list[str]:
    return [text[block.start : block.end] for block in group.blocks]


def split_chunks(text: str, groups: list[BlockGroup], chunks: list[str]) -> list[str]:
    """The chunks of ``text`` that no single block of ``groups`` contains whole."""
    broken = []
    for chunk in chunks:
        start = text.find(chunk)
        end = start + len(chunk)
        for group in groups:
            inside = any(b.start <= start and end <= b.end for b in group.blocks)
            if group.start < end and start < group.end and not inside:
                broken.append(chunk)
    return broken


A = "Alpha one.\n\nAlpha two."
B = "Beta only."
C = "Gamma one.\n\nGamma two.\n\nGamma three."
D = "Delta one.\n\nDelta two."


def test_first_request_of_a_chunk_is_never_split() -> None:
    boundaries = Boundaries()
    assert learned(boundaries, prompt([A, B, C])) == []
    assert len(boundaries) == 6  # every paragraph recorded, nothing decided from this request


def test_boundaries_seen_apart_are_cut_and_chunks_stay_whole() -> None:
    boundaries = Boundaries()
    learned(boundaries, prompt([A, B, C]))
    learned(boundaries, prompt([C, D, B, A], "other?"))
    text = prompt([B, A, C, D])
    (group,) = learned(boundaries, text)
    assert group.label == "retrieval_qa:learned" and group.format == "langchain"
    # A|C: A was followed by B and ended a context, C was preceded by B and opened one, never together;
    # B|A and C|D: cut in the second request (B had gone on with C, A had opened a context; C had closed one with
    # its three paragraphs), so being next to each other there showed two blocks, not one chunk: still cut
    assert renderings(text, group) == [B, A, C, D]
    (group,) = learned(boundaries, prompt([D, A, B, C], "more?"))
    assert split_chunks(prompt([D, A, B, C], "more?"), [group], [A, B, C, D]) == []


def test_a_boundary_is_not_undone_by_the_same_documents_retrieved_side_by_side_again() -> None:
    """A retriever ranks the same two documents next to each other for the next question too: the request that cut
    them does not count as a chunk shown whole, so the next one is cut alike (it goes out in the order the engine
    holds, not as sent). Counted, the second request would find each pair seen together once, apart once: not cut."""
    boundaries = Boundaries()
    learned(boundaries, prompt([A, B, C]))
    first = prompt([C, D, B, A], "one?")
    cut = [C, f"{D}\n\n{B}", A]  # D is new: nothing tells where it ends
    assert renderings(first, learned(boundaries, first)[0]) == cut
    for question in ("two?", "three?"):
        again = prompt([C, D, B, A], question)
        assert renderings(again, learned(boundaries, again)[0]) == cut


def test_a_pair_shown_whole_before_it_was_seen_apart_stays_one_chunk() -> None:
    """The other way round, the weighing holds: ``B\n\nA`` sent whole (nothing known, not cut), then ``B`` and ``A``
    each once elsewhere: seen apart as often as together, so the chunk is not cut."""
    boundaries = Boundaries()
    learned(boundaries, prompt([D, B, A, C], "one?"))
    learned(boundaries, prompt([B, D], "two?"))
    learned(boundaries, prompt([C, A], "three?"))
    text = prompt([D, B, A], "four?")
    assert split_chunks(text, learned(boundaries, text), [f"{B}\n\n{A}"]) == []


def test_a_new_chunk_is_cut_from_a_known_one_by_its_last_three_or_first_three_paragraphs() -> None:
    """One side new: ``C``'s three paragraphs were seen (going on otherwise), so its end is a boundary before the new
    ``D``; ``C`` opened a context with its three paragraphs, so the new ``A`` before it ends at a boundary."""
    for earlier, later in (([B, C], [C, D]), ([C, B], [A, C])):
        boundaries = Boundaries()
        learned(boundaries, prompt(earlier, "first?"))
        text = prompt(later, "second?")
        (group,) = learned(boundaries, text)
        assert renderings(text, group) == later


E = "Epsilon one.\n\nEpsilon two."


def test_a_new_chunk_is_cut_from_a_two_paragraph_one_only_beside_a_known_boundary() -> None:
    """``A`` (two paragraphs) closed a context after ``B``: that is a boundary only once ``B`` was also seen without
    ``A`` after it; until then ``B, A`` may be the end of one window and ``A`` the start of the next (``A, D``).
    Mirrored: ``D`` opened a context before ``B``, a boundary once ``B`` was seen after another paragraph."""
    for earlier, witness, later in (([B, A], [B, C], [A, D]), ([D, B], [E, B], [C, D])):
        boundaries = Boundaries()
        learned(boundaries, prompt(earlier, "first?"))
        text = prompt(later, "second?")
        assert learned(boundaries, text) == []
        boundaries = Boundaries()
        learned(boundaries, prompt(earlier, "first?"))
        learned(boundaries, prompt(witness, "third?"))
        (group,) = learned(boundaries, text)
        assert renderings(text, group) == later


def test_a_heading_shared_by_the_chunks_of_one_file_stays_with_each() -> None:
    """LlamaIndex puts a node's metadata before its text (``file_path: ...``, a blank line, the text), so every chunk
    of a file opens with the same paragraph. ``A`` went before the file's first chunk, now before its second: the
    run ``A`` + heading goes on otherwise, as a chunk's last paragraphs would, but the heading is the second chunk's
    own. Only runs that closed a context or a block count, so it is not cut from the text after it."""
    head = "file_path: /docs/guide.md"
    first = f"{head}\n\nGuide part one.\n\nMore of part one."
    second = f"{head}\n\nGuide part two.\n\nMore of part two."
    a = "Alpha one.\n\nAlpha two.\n\nAlpha three."
    for warm in ([], [[D, a], [a, B]]):  # A new, or already cut from its neighbours
        boundaries = Boundaries()
        for i, chunks in enumerate([*warm, [a, first]]):
            learned(boundaries, prompt(chunks, f"{i}?"))
        text = prompt([a, second], "two?")
        assert split_chunks(text, learned(boundaries, text), [a, second]) == []


def test_a_heading_shared_by_chunks_over_a_body_another_chunk_shares_stays_with_it() -> None:
    """``json.dump``'s docs cut in chunks that each open with the same ``(continued)`` heading, and ``json.dumps``'s
    with the same bodies under its own: ``T`` was seen followed by another paragraph, the body's first preceded by
    another heading, never together, so the two-sided rule cuts after ``T``; and before it, after the chunk ahead.
    ``T`` would be a block of one paragraph, never seen as one: it stays with the paragraph after it (the
    ``bench apps`` run that moved it away from its body: 48 questions, seed 0)."""
    head, other_head = (
        "json.dump(obj, fp, *, skipkeys=False) (continued)",
        "json.dumps(obj, *, skipkeys=False) (continued)",
    )
    body = "If specified, separators should be a tuple.\n\nIf sort_keys is true, the output is sorted by key."
    first = f"{head}\n\nIf allow_nan is false, a ValueError is raised.\n\nIf indent is set, arrays are pretty-printed."
    dump, dumps = f"{head}\n\n{body}", f"{other_head}\n\n{body}"
    boundaries = Boundaries()
    learned(boundaries, prompt([first, "Other chunk x."], "one?"))
    learned(boundaries, prompt([dumps, "Other chunk y."], "two?"))
    text = prompt([dumps, dump], "three?")
    assert split_chunks(text, learned(boundaries, text), [dump, dumps]) == []


def test_windows_overlapping_by_two_paragraphs_are_not_split() -> None:
    """A text splitter's overlap of two whole paragraphs: the second window opens with the first one's last two, and
    the first ends with the second one's first two; neither is cut there."""
    first = "p0 a.\n\np1 b.\n\np2 c.\n\np3 d.\n\np4 e."
    second = "p3 d.\n\np4 e.\n\np5 f.\n\np6 g.\n\np7 h."
    for earlier, later in (([first], [first, second]), ([first], [second]), ([second], [first, second]),
                           ([second], [B, first])):  # fmt: skip
        boundaries = Boundaries()
        learned(boundaries, prompt(earlier, "one?"))
        text = prompt(later, "two?")
        assert split_chunks(text, learned(boundaries, text), [first, second, B]) == []


def test_a_shared_paragraph_at_a_context_edge_does_not_cut_the_chunk_that_continues_it() -> None:
    """Sliding windows: ``P three.`` ended a context as the last of ``one``, and opens ``two``: it ended one after
    ``P two.``, not after the start of a context, so ``two`` stays whole (the one-sided rule needs both)."""
    one, two = "P one.\n\nP two.\n\nP three.", "P three.\n\nP four.\n\nP five."
    boundaries = Boundaries()
    learned(boundaries, prompt([one], "one?"))
    for text in (prompt([two], "two?"), prompt([B, two], "b two?")):
        assert split_chunks(text, learned(boundaries, text), [two, B]) == []


def test_overlapping_chunks_and_shared_headings_are_not_split() -> None:
    head = "Shared heading paragraph."
    x, y, z = f"{head}\n\nX body.", f"{head}\n\nY body.", "Z alone."
    overlap1, overlap2 = "P one.\n\nP two.\n\nP three.", "P three.\n\nP four."
    chunks = [x, y, z, overlap1, overlap2]
    boundaries = Boundaries()
    rng = random.Random(7)
    for i in range(60):
        picked = rng.sample(chunks, rng.randint(1, len(chunks)))
        text = prompt(picked, f"q{i}?")
        assert split_chunks(text, learned(boundaries, text), picked) == []


def test_slots_do_not_share_knowledge_and_memory_is_bounded() -> None:
    boundaries = Boundaries(max_paragraphs=8)
    for i in range(20):
        learned(boundaries, prompt([f"P{i}a.\n\nP{i}b.", f"Q{i}."]))
    assert len(boundaries) == 8
    other = Boundaries()
    learned(other, prompt([A, B]))
    for i in range(2):  # apart more often than together
        learned(other, prompt([B, A], f"apart {i}?"))
    chat = (
        "Use the following pieces of context to answer the user's question.\nIf you don't know the answer, just say "
        f"that you don't know, don't try to make up an answer.\n----------------\n{A}\n\n{B}"
    )
    assert learned(other, chat) == []  # another template: nothing learned there yet
    assert len(learned(other, prompt([A, B], "again?"))) == 1


def test_one_tenants_traffic_never_splits_another_tenants_documents() -> None:
    boundaries = Boundaries()
    for tenant in (b"k1", b"k1"):
        text = prompt([A, B, C]) if not len(boundaries) else prompt([C, D, B, A], "other?")
        boundaries.regroup(text, find_groups(text, "template"), tenant)
    text = prompt([B, A, C, D])
    assert boundaries.regroup(text, find_groups(text, "template"), b"k2") == []  # k2 learned nothing yet
    assert len(boundaries.regroup(text, find_groups(text, "template"), b"k1")) == 1


def test_a_chunk_seen_whole_is_not_cut_by_two_requests_that_show_its_paragraphs_apart() -> None:
    """The issue's attack: victim traffic shows ``a\n\nb`` whole; ``[a, x]`` and ``[y, b]`` then do not make
    the victim's next request cut it (the old rule did: ``a`` seen followed by another, ``b`` preceded by one)."""
    a, b, x, y = "Victim part one.", "Victim part two.", "Attacker x.", "Attacker y."
    victim, other = f"{a}\n\n{b}", "Another victim chunk."
    boundaries = Boundaries()
    learned(boundaries, prompt([victim, other], "victim?"))
    learned(boundaries, prompt([a, x], "x?"))
    learned(boundaries, prompt([y, b], "y?"))
    text = prompt([other, victim], "victim again?")
    assert split_chunks(text, learned(boundaries, text), [victim, other]) == []
    # whole twice now; seen apart more often than whole, on both sides: a boundary, but cutting it would leave ``a``
    # a block of one paragraph between two cuts, and ``a`` was never seen whole on its own: still not cut
    for i in range(2):
        learned(boundaries, prompt([a, x], f"x{i}?"))
        learned(boundaries, prompt([y, b], f"y{i}?"))
    assert split_chunks(text, learned(boundaries, text), [victim, other]) == []
    # the price without keys: a client that also gets ``a`` cut on both sides once (``q`` seen apart from it, ``a``
    # closing the context) has it seen whole, and then, sending the paragraphs apart more often than the chunk was
    # sent whole (each victim request left whole raised that bar), gets the victim's chunk cut
    q, r = "Attacker q.", "Attacker r."
    for i in range(2):
        learned(boundaries, prompt([q, r], f"q{i}?"))
    learned(boundaries, prompt([q, a], "q a?"))
    for i in range(4):
        learned(boundaries, prompt([a, x], f"x more {i}?"))
        learned(boundaries, prompt([y, b], f"y more {i}?"))
    assert split_chunks(text, learned(boundaries, text), [victim, other]) == [victim]


def test_chunks_sharing_paragraphs_stay_whole_when_sent_whole_more_often() -> None:
    """The json docs of dump and dumps share paragraphs: each chunk seen whole more often than apart stays whole."""
    shared = "If skipkeys is true, dict keys that are not of a basic type are skipped."
    dump = f"json.dump(obj, fp): serialize obj as a JSON formatted stream to fp.\n\n{shared}"
    dumps = f"json.dumps(obj): serialize obj to a JSON formatted str.\n\n{shared}"
    loads = "json.loads(s): deserialize s to a Python object."
    tail = f"{shared}\n\nIf ensure_ascii is true, non-ASCII characters are escaped."
    chunks = [dump, dumps, loads, tail]
    boundaries = Boundaries()
    rng = random.Random(11)
    for i in range(40):
        picked = rng.sample(chunks, 3)
        text = prompt(picked, f"json {i}?")
        assert split_chunks(text, learned(boundaries, text), picked) == []


def test_other_groups_pass_through() -> None:
    text = "<documents>\n<document>one</document>\n<document>two</document>\n</documents>"
    groups = find_groups(text)
    assert Boundaries().regroup(text, groups) == groups


_WORDS = st.lists(st.sampled_from(["lorem", "ipsum", "dolor", "sit", "amet", "magna", "nulla", "vitae"]), min_size=1,
                  max_size=6)  # fmt: skip


@st.composite
def corpora(draw: st.DrawFn) -> tuple[list[str], list[list[int]]]:
    """Chunks of 1-6 paragraphs (unique, or sliding windows that share one or two paragraphs with each neighbour but
    keep one of their own: a chunk made only of shared paragraphs is the documented blind spot), and requests."""
    n = draw(st.integers(2, 7))
    overlap = draw(st.integers(0, 2))
    sizes = draw(st.lists(st.integers(2 * overlap + 1, 2 * overlap + 2), min_size=n, max_size=n))
    paragraphs = [f"p{i} {' '.join(draw(_WORDS))}." for i in range(sum(sizes) + n)]
    chunks, at = [], 0
    for size in sizes:
        chunks.append("\n\n".join(paragraphs[at : at + size]))
        at += size - overlap
    requests = draw(
        st.lists(st.permutations(range(n)).flatmap(lambda p: st.integers(1, n).map(lambda k: p[:k])), max_size=12)
    )
    return chunks, [list(r) for r in requests]


@settings(max_examples=300, deadline=None)
@given(corpora())
def test_property_a_chunk_is_never_split_across_blocks(corpus: tuple[list[str], list[list[int]]]) -> None:
    chunks, requests = corpus
    boundaries = Boundaries()
    for i, request in enumerate(requests):
        picked = [chunks[c] for c in request]
        text = prompt(picked, f"question {i}?")
        groups = learned(boundaries, text)
        assert split_chunks(text, groups, picked) == []
        if i == 0:
            assert groups == []


def test_learning_converges_on_a_shuffled_workload() -> None:
    """Not vacuous: with the same chunks retrieved in varied orders, every document becomes its own block."""
    rng = random.Random(3)
    chunks = [f"Doc {i} first paragraph.\n\nDoc {i} second paragraph." for i in range(12)]
    boundaries = Boundaries()
    for i in range(40):
        learned(boundaries, prompt(rng.sample(chunks, 5), f"warm {i}?"))
    picked = rng.sample(chunks, 5)
    text = prompt(picked, "final?")
    (group,) = learned(boundaries, text)
    assert renderings(text, group) == picked


def test_the_applications_own_paragraph_after_the_context_never_moves() -> None:
    """An app's own system prompt with a rule after ``{context}`` (a template whose context runs to the end):
    the rule is seen after varying documents, so the blank line before it becomes a boundary; always last,
    it is the template's own text and stays out of the group (it moved as a block of its own before)."""
    system = "Answer the user's questions based on the below context:\n\n"
    rule = "Always answer in English, in two sentences at most."
    chunks = [f"Chunk {i} opens here.\n\nChunk {i} goes on here." for i in range(6)]
    rng = random.Random(2)
    boundaries, moved = Boundaries(), 0
    for _ in range(30):
        picked = rng.sample(chunks, 3)
        context = "\n\n".join(picked)
        text = f"{system}{context}\n\n{rule}"
        groups = learned(boundaries, text)
        edits = [(group, rng.sample(range(len(group)), len(group))) for group in groups]
        moved += audit_rewrite(text, splice_all(text, edits), picked).moved
    assert moved >= 5


def test_a_document_ranked_first_in_a_few_requests_is_not_taken_for_the_templates_text() -> None:
    """A retriever's top hit twice, always first in its context: in two of eight requests it is not the
    application's own text (which every request shows), so the blank line after it is a boundary."""
    chunks = [f"Chunk {i} opens here.\n\nChunk {i} goes on here." for i in range(8)]
    top = "Top document opens here.\n\nTop document goes on here."
    boundaries = Boundaries()
    for picked in ([0, 1], [2, 3], [4, 5], [6, 7], [1, 2], [3, 4]):
        learned(boundaries, prompt([chunks[i] for i in picked]))
    learned(boundaries, prompt([top, chunks[5]]))
    learned(boundaries, prompt([top, chunks[6]]))
    text = prompt([top, chunks[0], chunks[7]])
    (group,) = learned(boundaries, text)
    assert renderings(text, group) == [top, chunks[0], chunks[7]]


def test_with_keys_sharing_the_state_one_key_cannot_cut_another_keys_chunk_however_often_it_sends() -> None:
    """``--shared-cache`` with keys: evidence counts distinct keys, not requests. The attack above, sent many
    times by one key, no longer cuts the victim's chunk; the same traffic from more keys than showed it whole
    does (independent clients confirming a boundary)."""
    a, b, x, y = "Victim part one.", "Victim part two.", "Attacker x.", "Attacker y."
    victim, other = f"{a}\n\n{b}", "Another victim chunk."
    boundaries = Boundaries()

    def sent(chunks: list[str], question: str, key: bytes) -> list[BlockGroup]:
        text = prompt(chunks, question)
        return boundaries.regroup(text, find_groups(text, "template"), client=key)

    sent([victim, other], "victim?", b"victim")
    for i in range(10):
        sent([a, x], f"x{i}?", b"attacker")
        sent([y, b], f"y{i}?", b"attacker")
    text = prompt([other, victim], "victim again?")
    assert split_chunks(text, sent([other, victim], "victim again?", b"victim"), [victim, other]) == []
    for key in (b"k2", b"k3"):  # two more keys show the paragraphs apart: three clients against one
        sent([a, x], "x?", key)
        sent([y, b], "y?", key)
    # and show ``a`` as a block of its own (cut from ``q``, closing the context): ``a`` between two cuts is then
    # known whole (a paragraph never seen whole is not cut from both neighbours)
    for key in (b"k2", b"k3"):
        sent([q := "Attacker q.", "Attacker r."], "q?", key)
        sent([q, a], "q a?", key)
    assert split_chunks(text, sent([other, victim], "victim again?", b"victim"), [victim, other]) == [victim]


HEAD = "You are the support assistant of ACME. Answer from the excerpts below."
ASK = "Using only the excerpts above, answer: "


def custom(chunks: list[str], question: str, day: str = "") -> str:
    return f"{HEAD}\n\n{day}" + "\n\n".join(chunks) + f"\n\n{ASK}{question}"


def test_an_unknown_template_is_a_candidate_only_where_nothing_else_is_found() -> None:
    text = custom([A, B, C], "which?")
    assert find_groups(text) == []
    (candidate,) = find_groups(text, learn=True)
    assert (candidate.format, candidate.label) == ("learned", "learned:paragraphs")
    assert text[: candidate.start] == f"{HEAD}\n\n"  # the first paragraph is the application's, and its slot
    assert find_groups(prompt([A, B, C]), learn=True)[0].format == "langchain"  # a known template wins
    assert find_groups("One paragraph.\n\nTwo.", learn=True) == []  # too short to hold a context


def test_an_unknown_template_is_learned_and_its_question_and_changing_lines_stay_in_place() -> None:
    """Documents of an application's own template are cut once traffic shows them apart; the question after them
    (a fixed lead-in, learned from three requests) and a line that changes with every request never move."""
    rng = random.Random(2)
    chunks = [f"Doc {i} first paragraph.\n\nDoc {i} second paragraph." for i in range(8)]
    boundaries = Boundaries()
    for i in range(30):
        text = custom(rng.sample(chunks, 4), f"question {i}?", f"Today is day {i}.\n\n")
        learned(boundaries, text)
    picked = rng.sample(chunks, 4)
    text = custom(picked, "final?", "Today is day 99.\n\n")
    (group,) = boundaries.regroup(text, find_groups(text, learn=True))
    assert group.label == "learned:learned"
    moving = renderings(text, group)
    assert all(ASK not in block and "Today is" not in block for block in moving)
    assert split_chunks(text, [group], picked) == []
    assert len(moving) >= 2 and set(moving) <= set(picked)
