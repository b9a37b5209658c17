"""Block identity: every block the scheduler orders is an ``int``.

Integer blocks (token ids, document ids, content hashes) are used as they are: any Python ``int``, negative or
beyond 64 bits. Text and bytes are hashed with BLAKE2b to an unsigned 64-bit int, which is stable across
processes and runs (unlike ``hash()``, which is salted per process), so two gateway replicas or a restart agree
on the identity of the same content.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b
from typing import TypeAlias

__all__ = ["BlockId", "block_id", "block_ids"]

BlockId: TypeAlias = int

_PERSON = b"prefixgate-blk"


def block_id(block: int | str | bytes) -> BlockId:
    """Return the stable identity of one block.

    ``bool`` is rejected although it is an ``int`` subclass: ``True`` as a document id is almost certainly a bug
    in the caller, and silently equating it with ``1`` would merge two different blocks.
    """
    if isinstance(block, bool):
        raise TypeError("a block must be an int, str or bytes, not bool")
    if isinstance(block, int):
        return block
    if isinstance(block, str):
        block = block.encode("utf-8", "surrogatepass")
    elif not isinstance(block, bytes):
        raise TypeError(f"a block must be an int, str or bytes, not {type(block).__name__}")
    return int.from_bytes(blake2b(block, digest_size=8, person=_PERSON).digest(), "big")


def block_ids(blocks: Iterable[int | str | bytes]) -> list[BlockId]:
    """Return :func:`block_id` of each block, in order (duplicates kept)."""
    return [block_id(block) for block in blocks]
