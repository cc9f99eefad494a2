"""Which cache block holds which tokens: allocation, reference counts, prefix caching.

A block holds `block_size` consecutive tokens of one sequence. Once a block is full and
its latents are computed, it gets a *chained* hash: hash(previous block's hash, its token
ids), so equal hashes mean equal prefixes, not merely equal blocks. A new request whose
leading blocks hash to cached ones shares them (ref count + 1) instead of recomputing
them; a hit is confirmed against the stored token ids, so a hash collision costs a
recompute, never a wrong answer.

A block that shows (part of) an image keys it by the image's content hash and offset too
(`block_key`): equal placeholder ids over another picture are another block.

A block whose ref count drops to 0 goes back to the free list *with its hash*: it can
still be hit until the space is needed. The free list is LRU: reuse takes the block freed
longest ago, and blocks that hold nothing reusable are handed out first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from nanoseek.engine.sequence import Sequence


def chain_hash(prev: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


def block_key(seq: Sequence, ids: list[int], b: int, block_size: int) -> tuple:
    """What block b of the sequence holds: its token ids, then (content hash, offset of the
    image's first token from the block's) for each image whose vision tokens it covers."""
    lo, hi = b * block_size, (b + 1) * block_size
    return tuple(ids[lo:hi]) + tuple((im.content_hash, im.start - lo) for im in seq.images
                                     if im.start < hi and im.end > lo)


@dataclass
class CacheBlock:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple = field(default_factory=tuple)  # its block_key: token ids (+ image hashes)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [CacheBlock(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.hits = self.queries = 0      # prefix-cache blocks hit / looked up

    # ----------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (including cached blocks nobody uses)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -------------------------------------------------------------- allocation
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evicted: its contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest run of leading full blocks already in the cache. At
        least one token is left to compute: the model must run to give the next logits."""
        if not self.enable_prefix_caching:
            return []
        ids, hits, prev = seq.token_ids, [], None
        for b in range((len(ids) - 1) // self.block_size):
            chunk = block_key(seq, ids, b, self.block_size)
            prev = chain_hash(prev, chunk)
            block_id = self.cached.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        needed = self.blocks_for(len(seq)) - len(hits)
        return needed <= len(self.free) - reclaimed

    def allocate(self, seq: Sequence) -> int:
        """Blocks for every token the sequence has now, sharing the cached prefix. Returns
        how many leading tokens the cache already holds (the scheduler records them)."""
        assert not seq.block_table, f"request {seq.request_id} already holds blocks"
        hits = self._cached_prefix(seq)
        self.queries += (len(seq) - 1) // self.block_size if self.enable_prefix_caching else 0
        self.hits += len(hits)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_for(len(seq)) - len(hits))]
        seq.num_hashed_blocks = len(hits)
        return len(hits) * self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total (a decode step, a draft token)."""
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take_free())

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Room for the tokens the next step computes, up to num_tokens in all, beyond the
        blocks `allocate` and `grow` give: nothing here (a V4 manager adds its window blocks)."""

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks go first so that, under LRU, the
        prefix (the part other requests can share) survives longest."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing to reuse: hand it out first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    # --------------------------------------------------------------- hashing
    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash every block that is now full and computed, so later requests can hit it."""
        if not self.enable_prefix_caching:
            return
        ids, bs = seq.token_ids, self.block_size
        prev = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        if seq.num_hashed_blocks and prev is None:
            return  # the chain was reset under this sequence: never hash its later blocks
        while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed:
            b = seq.num_hashed_blocks
            block = self.blocks[seq.block_table[b]]
            chunk = block_key(seq, ids, b, bs)
            prev = chain_hash(prev, chunk)
            if block.hash is None:
                block.hash, block.token_ids = prev, chunk
                self.cached.setdefault(prev, block.block_id)
            seq.num_hashed_blocks += 1

    def forget_seq(self, seq: Sequence) -> None:
        """Un-hash the blocks only this (failed) sequence holds: what it computed may be NaN,
        and a later request must not hit it. A block another request shares keeps its hash
        until that request finishes too (if it read NaN, it fails and forgets it then)."""
        self.forget_blocks(seq.block_table)

    def forget_blocks(self, block_ids) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 1 and block.hash is not None:
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()

    def reset_prefix_cache(self) -> None:
        """Drop all hashes (the cached latents are stale, e.g. the weights changed)."""
        self.cached.clear()
        for block in self.blocks:
            block.hash, block.token_ids = None, ()

    def check(self) -> None:
        """Invariants (for tests): free blocks have no users, used blocks have some."""
        for block in self.blocks:
            assert (block.block_id in self.free) == (block.ref_count == 0), block
