"""The simulated engine's tokenizer and chat template.

Text is cut at every space; the first chunk, and every later chunk with its leading space restored, is split GPT-2
style into pieces (up to eight word characters with an optional leading space, up to four punctuation characters
with an optional leading space, up to eight whitespace characters), and each piece is hashed with blake2b into a
fixed vocabulary, so token ids are stable across processes and machines (never Python's salted ``hash()``). Two memos
(chunk -> ids, piece -> id) make a text cost one ``str.split`` plus dict lookups once its words have been seen, and
a small LRU of recently seen long texts makes a repeated prompt or message nearly free.

Chat messages are rendered with a fixed ChatML-like template whose role markers are special tokens and whose
message contents are tokenised one by one, so two chat requests share a token prefix exactly when their rendered
messages share a prefix (message boundaries are always token boundaries).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable
from itertools import islice
from typing import Final

__all__ = [
    "END_OF_TEXT",
    "IM_END",
    "IM_START",
    "NUM_SPECIAL",
    "TOOLS_START",
    "VOCAB_SIZE",
    "ChatTurn",
    "Tokenizer",
]

VOCAB_SIZE: Final = 151_936
NUM_SPECIAL: Final = 16
END_OF_TEXT: Final = 0
IM_START: Final = 1
IM_END: Final = 2
TOOLS_START: Final = 3

# Every character is a word character, whitespace or neither, so the pieces always concatenate back to the text.
_PIECE: Final = re.compile(r" ?\w{1,8}| ?[^\w\s]{1,4}|\s{1,8}")
_MEMO_LIMIT: Final = 1 << 18
_CHUNK_MEMO_MAX_CHARS: Final = 64
_TEXT_MEMO_MIN_CHARS: Final = 256

ChatTurn = tuple[str, str]
"""One chat message as the template sees it: (role, text). The caller flattens non-text content to text."""


def _piece_id(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return NUM_SPECIAL + int.from_bytes(digest, "little") % (VOCAB_SIZE - NUM_SPECIAL)


class _PieceMemo(dict[str, int]):
    """piece -> token id; a miss hashes the piece once."""

    __slots__ = ()

    def __missing__(self, piece: str) -> int:
        token = self[piece] = _piece_id(piece)
        return token


class _ChunkMemo(dict[str, tuple[int, ...]]):
    """chunk (a space-free run that followed a space) -> ids of the space and the chunk; short chunks only."""

    __slots__ = ("_pieces",)

    def __init__(self, pieces: _PieceMemo) -> None:
        super().__init__()
        self._pieces = pieces

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        tokens = tuple(map(self._pieces.__getitem__, _PIECE.findall(" " + chunk)))
        if len(chunk) <= _CHUNK_MEMO_MAX_CHARS:
            self[chunk] = tokens
        return tokens


class Tokenizer:
    """Deterministic text -> token ids, for one event loop (the memos are not locked)."""

    __slots__ = ("_chunks", "_memo", "_role_headers", "_text_budget", "_text_memo", "_text_tokens")

    def __init__(self, text_memo_tokens: int = 1_000_000) -> None:
        self._memo = _PieceMemo()
        self._chunks = _ChunkMemo(self._memo)
        self._role_headers: dict[str, tuple[int, ...]] = {}
        self._text_memo: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._text_budget = text_memo_tokens
        self._text_tokens = 0

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of ``text``; the same text always gives the same ids, in any process."""
        if len(text) < _TEXT_MEMO_MIN_CHARS:
            return self._encode(text)
        memo = self._text_memo
        tokens = memo.get(text)
        if tokens is not None:
            memo.move_to_end(text)
            return tokens
        tokens = self._encode(text)
        if len(tokens) <= self._text_budget:
            memo[text] = tokens
            self._text_tokens += len(tokens)
            while self._text_tokens > self._text_budget:
                _, dropped = memo.popitem(last=False)
                self._text_tokens -= len(dropped)
        return tokens

    def _encode(self, text: str) -> tuple[int, ...]:
        memo, chunk_memo = self._memo, self._chunks
        if len(memo) > _MEMO_LIMIT or len(chunk_memo) > _MEMO_LIMIT:
            memo.clear()
            chunk_memo.clear()
        chunks = text.split(" ")
        out = list(map(memo.__getitem__, _PIECE.findall(chunks[0])))
        for tokens in map(chunk_memo.__getitem__, islice(chunks, 1, None)):
            out += tokens
        return tuple(out)

    @staticmethod
    def pieces(text: str) -> list[str]:
        """The pieces ``encode`` hashes, one token each; they concatenate back to ``text``."""
        chunks = text.split(" ")
        out = _PIECE.findall(chunks[0])
        for chunk in islice(chunks, 1, None):
            out += _PIECE.findall(" " + chunk)
        return out

    def piece_id(self, piece: str) -> int:
        """Token id of one piece, as ``encode`` assigns it."""
        return self._memo[piece]

    def render_chat(self, turns: Iterable[ChatTurn], tools: str | None = None) -> list[int]:
        """Tokens of a ChatML-like prompt that ends with the assistant generation header.

        ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``. Tool
        definitions, when given, come first as their own block, as chat templates put them in the preamble.
        """
        out: list[int] = []
        if tools is not None:
            out.append(TOOLS_START)
            out += self.encode(tools)
            out.append(IM_END)
        newline = self._memo["\n"]
        for role, text in turns:
            out += self._role_header(role)
            out += self.encode(text)
            out.append(IM_END)
            out.append(newline)
        out += self._role_header("assistant")
        return out

    def _role_header(self, role: str) -> tuple[int, ...]:
        header = self._role_headers.get(role)
        if header is None:
            header = (IM_START, *self._encode(role), self._memo["\n"])
            if len(self._role_headers) < 64:
                self._role_headers[role] = header
        return header
