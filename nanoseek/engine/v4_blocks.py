"""Two block spaces for DeepSeek-V4: compressed blocks for the whole sequence, window blocks only while they are in the window.

A V4 layer keeps two kinds of per-token state with different lifetimes (engine/v4_cache.py):
  * compressed entries (and CSA's compressed indexer keys): one per m or m' tokens, read by
    every later query, so kept for the sequence's life. They live in the *main* space, the
    one `BlockManager` already runs: one block per `block_size` tokens, allocated on
    admission, hashed for prefix caching.
  * sliding-window rows (K=V of each token, every layer) and the compressors' carry (the
    open window's projections, CSA's overlap half): only the last n_win - 1 tokens are ever
    read again. They live in a second, small space of *window blocks*, one per token block
    again, allocated just before the tokens are computed (`reserve`) and released as soon as
    the window has slid past them (`slide`), as vLLM's hybrid KV-cache manager frees
    sliding-window blocks.

Why two spaces rather than one block holding both: a block of compressed entries must stay
for the whole request while its window rows are dead n_win tokens later. In one block they
could only be freed together, which would keep every token's window row alive: V3's cost per
token again, the thing V4 is built to avoid.

Prefix caching: a window block is released *with its hash* (the main block's chain hash), so
it stays in the window space's LRU free list and can still be hit until its space is needed.
A hit of k main blocks resumes at P = k·block_size, which needs (1) the compressed entries of
[0, P) (the main blocks), (2) the window rows of [P - n_win + 1, P) and (3) the compressors'
state at P. block_size is a multiple of every compression rate, so P closes every
compressor's window: no open window is carried, and CSA's overlap half at P is filed with
window block k - 1. (2) and (3) are in the last ceil((n_win - 1) / block_size) window blocks;
the hit is shortened until they are all still cached. So a request whose shared prefix ends
mid-window reuses the blocks up to the last block boundary before it (a window boundary too)
and computes the rest.

The window space is sized so that it never runs out (`window_blocks_needed`): every running
request holds at most the blocks of its window plus those of the tokens one step computes.
"""

from __future__ import annotations

from nanoseek.engine.block_manager import BlockManager, CacheBlock
from nanoseek.engine.sequence import Sequence


def window_span(n_win: int, block_size: int) -> int:
    """Window blocks a request keeps between steps: those holding the last n_win - 1 tokens
    (plus one when they straddle a block boundary)."""
    return -(-(n_win - 1) // block_size) + 1


def window_blocks_needed(n_win: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """A window space no schedule can exhaust: every request's span, plus the blocks of one
    step's tokens (a chunk of n tokens starting mid-block touches ceil(n / block_size) + 1)."""
    return max_num_seqs * (window_span(n_win, block_size) + 1) + -(-max_num_batched_tokens // block_size)


class V4BlockManager(BlockManager):
    """`BlockManager` over the compressed blocks, plus `window`, a second one over the window
    blocks. A sequence's `window_table[b]` is the window block of token block b, None once
    released (or never needed, before a prefix hit's last window)."""

    def __init__(self, num_blocks: int, num_window_blocks: int, block_size: int, n_win: int,
                 enable_prefix_caching: bool = True):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.window = BlockManager(num_window_blocks, block_size, enable_prefix_caching)
        self.n_win = n_win
        self.window_hits = 0  # prefix-cache hits cut short because their window blocks were gone

    # ------------------------------------------------------------ prefix hits
    def _window_blocks_for_hit(self, hits: list[int]) -> list[int] | None:
        """The window blocks a hit of len(hits) main blocks needs (token blocks
        k - span .. k - 1), or None if one of them is no longer cached."""
        k, bs = len(hits), self.block_size
        first = max(0, k - (-(-(self.n_win - 1) // bs)))
        out = []
        for b in range(first, k):
            main = self.blocks[hits[b]]
            wid = self.window.cached.get(main.hash)
            if wid is None or self.window.blocks[wid].token_ids != main.token_ids:
                return None
            out.append(wid)
        return out

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The main blocks' longest hit, shortened until its window blocks are cached too."""
        hits = super()._cached_prefix(seq)
        while hits and self._window_blocks_for_hit(hits) is None:
            hits = hits[:-1]
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        return super().can_allocate(seq)  # the window space is sized never to run out

    def allocate(self, seq: Sequence) -> int:
        cached = super().allocate(seq)
        k = cached // self.block_size
        wids = self._window_blocks_for_hit(seq.block_table[:k]) if k else []
        seq.window_table = [None] * (k - len(wids))
        for wid in wids:
            block = self.window.blocks[wid]
            if block.ref_count == 0:
                del self.window.free[wid]
            block.ref_count += 1
            seq.window_table.append(wid)
        return cached

    # ------------------------------------------------------ window blocks
    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Window blocks for every token block up to num_tokens (the tokens the next step
        computes). The space is sized so that this cannot fail (`window_blocks_needed`)."""
        while len(seq.window_table) < self.blocks_for(num_tokens):
            if not self.window.free:
                raise RuntimeError(f"the window space ({self.window.num_blocks} blocks) is exhausted; "
                                   "window_blocks_needed sized it too small")
            seq.window_table.append(self.window._take_free())

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        super().grow(seq, num_tokens)
        self.reserve(seq, num_tokens)

    def slide(self, seq: Sequence) -> None:
        """Release the window blocks whose tokens all lie before the window of the next
        query (positions < num_computed - (n_win - 1)); they keep their hash."""
        keep_from = seq.num_computed - (self.n_win - 1)
        for b in range(min(len(seq.window_table), max(keep_from, 0) // self.block_size)):
            if seq.window_table[b] is not None:
                self._release(seq.window_table[b])
                seq.window_table[b] = None

    def _release(self, wid: int) -> None:
        block: CacheBlock = self.window.blocks[wid]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.window.free[wid] = None
            if block.hash is None:
                self.window.free.move_to_end(wid, last=False)

    def free_seq(self, seq: Sequence) -> None:
        for wid in reversed(seq.window_table):
            if wid is not None:
                self._release(wid)
        seq.window_table = []
        super().free_seq(seq)

    def forget_seq(self, seq: Sequence) -> None:
        """A failed sequence's window blocks are forgotten with its main blocks."""
        self.window.forget_blocks([wid for wid in seq.window_table if wid is not None])
        super().forget_seq(seq)

    # --------------------------------------------------------------- hashing
    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the new full main blocks, give their window blocks the same hash (their rows
        and the carry at their end are computed), then slide the window."""
        before = seq.num_hashed_blocks
        super().register_full_blocks(seq)
        for b in range(before, seq.num_hashed_blocks):
            wid = seq.window_table[b] if b < len(seq.window_table) else None
            main = self.blocks[seq.block_table[b]]
            if wid is None or main.hash is None:
                continue
            wblock = self.window.blocks[wid]
            if wblock.hash is None:
                wblock.hash, wblock.token_ids = main.hash, main.token_ids
                self.window.cached.setdefault(main.hash, wid)
        self.slide(seq)

    def reset_prefix_cache(self) -> None:
        super().reset_prefix_cache()
        self.window.reset_prefix_cache()

    def check(self) -> None:
        super().check()
        self.window.check()
