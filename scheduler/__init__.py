"""Pure, synchronous scheduling: block identity, live prefix index, online and batch plans, dedup.

Framework-free on purpose (no litestar, httpx or gateway imports): the gateway calls it inline on the event
loop (microseconds per request) and may run a big batch plan in a worker thread on an index snapshot.

- :mod:`scheduler.blocks`: block identity (``block_id``).
- :mod:`scheduler.ids`: request ids (minting; normalising engine-mangled ids).
- :mod:`scheduler.order`: the canonical block order, the one context planner (``arrange``), and mapping new
  orders back to input positions.
- :mod:`scheduler.cooccur`: block co-occurrence, the online plan's first preference after the cached path.
- :mod:`scheduler.trie`: the copy-on-write radix trie of one key.
- :mod:`scheduler.index`: ``LiveIndex``, the online plan / commit / evict loop.
- :mod:`scheduler.batch`: ``plan_batch`` for ``/reorder``.
- :mod:`scheduler.dedup`: ``ConversationTracker`` for multi-turn dedup.
"""

from .batch import BatchPlan, plan_batch
from .blocks import BlockId, block_id, block_ids
from .cooccur import Cooccurrence
from .dedup import DEFAULT_HINT_TEMPLATE, ConversationTracker, DedupResult, render_hint
from .ids import mint_request_id, normalize_request_id, normalize_request_ids, request_id_candidates
from .index import EvictResult, IndexStats, LiveIndex, Plan
from .order import Popularity, PopularityMode, arrange, permutation
from .trie import TrieView

__all__ = [
    "DEFAULT_HINT_TEMPLATE",
    "BatchPlan",
    "BlockId",
    "ConversationTracker",
    "Cooccurrence",
    "DedupResult",
    "EvictResult",
    "IndexStats",
    "LiveIndex",
    "Plan",
    "Popularity",
    "PopularityMode",
    "TrieView",
    "arrange",
    "block_id",
    "block_ids",
    "mint_request_id",
    "normalize_request_id",
    "normalize_request_ids",
    "permutation",
    "plan_batch",
    "render_hint",
    "request_id_candidates",
]
