"""The corpus, retriever and question sets of ``bench apps``: Python standard library documentation, offline.

Each public function, class and method of a few stdlib modules with a docstring becomes a document headed by its
qualified name and signature; a docstring longer than ``CHUNK_CHARS`` is cut at blank lines into several chunks
(so doctest examples, indented code and lists stay inside one chunk, as a text splitter keeps them). Retrieval is
Okapi BM25 over lowercase word tokens.

Question sets (deterministic in the seed):

- ``diverse``: distinct questions asked in topic bursts (several users asking about one module in a row), each
  naming two or three of the module's members: the documents retrieved recur across distinct questions, in
  different combinations and ranks.
- ``repeat``: a few distinct questions, then the same ones again in the same order (a retried or popular question):
  direct already hits the cache on the second pass, so the gateway can only keep up.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["CHUNK_CHARS", "MODULES", "BM25", "Chunk", "build_corpus", "questions"]

MODULES = ("json", "re", "itertools", "collections", "pathlib", "functools", "textwrap", "heapq", "bisect", "string")
CHUNK_CHARS = 700
_WORD = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One retrievable document: where it comes from (``module.member``, part) and its text."""

    module: str
    member: str
    text: str


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _members(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    found: list[tuple[str, object]] = []
    for name in sorted(getattr(module, "__all__", None) or dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        found.append((name, obj))
        if inspect.isclass(obj) and getattr(obj, "__module__", "").partition(".")[0] == module_name.partition(".")[0]:
            for attr, value in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isfunction(value) or inspect.ismethoddescriptor(value)):
                    found.append((f"{name}.{attr}", value))
    return found


def _paragraph_chunks(text: str, limit: int) -> list[str]:
    """Cut at blank lines into pieces of at most ``limit`` characters (a paragraph longer than that stays whole)."""
    chunks: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if current and len(candidate) > limit:
            chunks.append(current)
            current = paragraph
        else:
            current = candidate
    if current:
        chunks.append(current)
    return chunks


def build_corpus(modules: Sequence[str] = MODULES, chunk_chars: int = CHUNK_CHARS) -> list[Chunk]:
    """Every documented member of ``modules`` as one or more chunks, in a stable order."""
    corpus: list[Chunk] = []
    for module_name in modules:
        for name, obj in _members(module_name):
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 80:
                continue
            head = f"{module_name}.{name}{_signature(obj)}"
            for part, body in enumerate(_paragraph_chunks(doc, chunk_chars)):
                title = head if part == 0 else f"{head} (continued)"
                corpus.append(Chunk(module_name, name, f"{title}\n\n{body}"))
    return corpus


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class BM25:
    """Okapi BM25 (k1 1.5, b 0.75) over a fixed list of texts."""

    texts: Sequence[str]
    k1: float = 1.5
    b: float = 0.75
    _tf: list[Counter[str]] = field(default_factory=list, init=False)
    _idf: dict[str, float] = field(default_factory=dict, init=False)
    _lengths: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        df: Counter[str] = Counter()
        for text in self.texts:
            tokens = _tokens(text)
            self._tf.append(Counter(tokens))
            self._lengths.append(len(tokens))
            df.update(set(tokens))
        n = len(self.texts)
        self._idf = {term: math.log(1 + (n - count + 0.5) / (count + 0.5)) for term, count in df.items()}

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best texts for ``query``, best first (ties: corpus order)."""
        average = sum(self._lengths) / max(len(self._lengths), 1)
        terms = [term for term in set(_tokens(query)) if term in self._idf]
        scores: list[tuple[float, int]] = []
        for i, tf in enumerate(self._tf):
            score = 0.0
            norm = self.k1 * (1 - self.b + self.b * self._lengths[i] / average)
            for term in terms:
                f = tf.get(term, 0)
                if f:
                    score += self._idf[term] * f * (self.k1 + 1) / (f + norm)
            if score > 0:
                scores.append((-score, i))
        return [i for _, i in sorted(scores)[:k]]


_FORMS = (
    "How do I use {a} together with {b} in {m}?",
    "What is the difference between {a} and {b}?",
    "When should I call {a} instead of {b} ({m})?",
    "Explain {a}, {b} and {c} with an example.",
    "Which arguments does {a} accept, and how does {b} relate to it?",
)


def questions(corpus: Sequence[Chunk], kind: str, count: int, seed: int = 0) -> list[str]:
    """``count`` questions of set ``kind`` (``diverse`` or ``repeat``) about the corpus's modules."""
    rng = random.Random(f"apps:{seed}:{kind}")
    by_module: dict[str, list[str]] = {}
    for chunk in corpus:
        names = by_module.setdefault(chunk.module, [])
        if chunk.member not in names:
            names.append(chunk.member)
    modules = [m for m, names in by_module.items() if len(names) >= 4]
    rng.shuffle(modules)
    burst = 4

    def ask(module: str) -> str:
        a, b, c = (f"{module}.{name}" for name in rng.sample(by_module[module][:8], 3))
        return rng.choice(_FORMS).format(a=a, b=b, c=c, m=module)

    if kind == "diverse":
        asked: list[str] = []
        while len(asked) < count:
            module = modules[(len(asked) // burst) % len(modules)]
            question = ask(module)
            if question not in asked:
                asked.append(question)
        return asked
    if kind == "repeat":
        distinct = [ask(modules[i % len(modules)]) for i in range((count + 1) // 2)]
        return (distinct + distinct)[:count]
    raise ValueError(f"unknown question set {kind!r}")
