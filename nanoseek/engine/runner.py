"""One forward of the model over a batch of sequences of different lengths.

Each sequence contributes its new tokens (a prefill chunk, or the pending token plus an
optional draft); they are right-padded into [B, S] with explicit positions, and the
paged cache's `BatchView` supplies every sequence's cached latents. Prefill runs with
absorb=False (decompress c_KV into per-head k, v over prefix + new tokens, then SDPA);
decode with absorb=True (attention directly over the gathered latents).

`run(batch)` is one step's model work: the forwards, sampling, and with speculation the
draft verification and the next drafts (`spec.MTPSpeculator`). It only reads sequences;
what it found goes back as one `SeqOutput` per sequence, which the scheduler's
`postprocess` applies. Hidden states stay here: nothing travels back up for MTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nanoseek.engine.cache import BatchView, PagedLatentCache
from nanoseek.engine.sampler import Sample, sample_batch
from nanoseek.engine.sequence import Sequence, SeqOutput
from nanoseek.engine.spec import MTPSpeculator
from nanoseek.engine.spec_policy import SpecPolicy
from nanoseek.engine.v4_cache import PagedV4Cache, SeqView
from nanoseek.engine.v4_decode import DecodeView
from nanoseek.model import CausalLM

if TYPE_CHECKING:  # imported only for a vision-language model (transformers' towers)
    from nanoseek.engine.vision import VisionPrompts


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedLatentCache | PagedV4Cache, speculative: bool = False,
                 spec_policy: SpecPolicy | None = None, vision: VisionPrompts | None = None):
        self.model, self.cache, self.vision = model, cache, vision
        self.device = next(model.parameters()).device
        self.forwards = 0
        self.spec = MTPSpeculator(self, spec_policy) if speculative else None
        self.drafting = False  # whether this step runs MTP (the speculator's policy decides)

    # ------------------------------------------------------------------ one step
    def run(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]],
            load: int | None = None) -> list[SeqOutput]:
        """One step: the decodes (absorbed, one forward), then the prefill chunks
        (decompressed, one forward). Outputs in that order: decodes, then prefills.
        load: the requests the engine holds (`Scheduler.load`), which the speculation
        policy weighs; default: this step's batch."""
        if self.spec is not None:
            self.drafting = self.spec.policy.should_draft(load or len(decodes) + len(prefills))
        outs = self._decode(decodes) if decodes else []
        return outs + (self._prefill(prefills) if prefills else [])

    def _prefill(self, items: list[tuple[Sequence, int]]) -> list[SeqOutput]:
        seqs, chunks = [s for s, _ in items], [n for _, n in items]
        starts = [s.num_computed for s in seqs]
        images = [s.images for s in seqs] if any(s.images for s in seqs) else None
        h, mtp_in, _ = self._forward([s.tokens(st, st + n) for s, st, n in zip(seqs, starts, chunks)], starts,
                                     [s.block_table for s in seqs], absorb=False,
                                     window_tables=[s.window_table for s in seqs], images=images)
        last = [b for b, (s, st, n) in enumerate(zip(seqs, starts, chunks)) if st + n == len(s)]
        samples: list[list[Sample]] = [[] for _ in items]  # a prompt whose last chunk ran samples a token
        if last:
            for b, smp in zip(last, self.sample([seqs[b] for b in last],
                                                self.logits(h[last, [chunks[b] - 1 for b in last]]))):
                samples[b] = [smp]
        drafts = mtp_from = [None] * len(seqs)
        if self.drafting:
            drafts, mtp_from = self.spec.draft_prefill(seqs, starts, chunks, samples, mtp_in)
        return self._outputs(samples, drafts, mtp_from)

    def _decode(self, seqs: list[Sequence]) -> list[SeqOutput]:
        starts = [s.num_computed for s in seqs]
        inputs = [[s.last_token] + ([s.draft] if s.draft is not None else []) for s in seqs]
        h, mtp_in, view = self._forward(inputs, starts, [s.block_table for s in seqs], absorb=True,
                                        window_tables=[s.window_table for s in seqs])
        if h.shape[1] == 1:
            samples = [[smp] for smp in self.sample(seqs, self.logits(h[:, 0]))]
        else:  # one head call for both rows; an accepted draft adds a second sample
            logits = self.logits(h)
            samples = [[smp] for smp in self.sample(seqs, logits[:, 0])]
            self.spec.verify(seqs, logits, samples)
        if isinstance(view, DecodeView):  # V4: keep the compressors' state after the tokens kept
            view.commit([len(smp) for smp in samples])
        drafts = mtp_from = [None] * len(seqs)
        if self.drafting:  # an accepted draft's latents are real: two positions computed
            drafts, mtp_from = self.spec.draft_decode(seqs, starts, samples, mtp_in, view)
        return self._outputs(samples, drafts, mtp_from)

    @staticmethod
    def _outputs(samples, drafts, mtp_from) -> list[SeqOutput]:
        """One SeqOutput per sequence. A failed sample (non-finite logits) fails its
        sequence: no token, no draft."""
        return [SeqOutput(error=smp[0].error) if smp and smp[0].error is not None else SeqOutput(smp, d, f)
                for smp, d, f in zip(samples, drafts, mtp_from)]

    @staticmethod
    def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[Sample]:
        return sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])

    # ------------------------------------------------------------ model calls
    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        S = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (S - len(r)) for r in rows], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def forward(self, inputs: list[list[int]], starts: list[int], block_tables: list[list[int]],
                absorb: bool, window_tables: list[list[int | None]] | None = None) -> torch.Tensor:
        """inputs[b]: new token ids of sequence b, at positions starts[b], starts[b]+1, ...
        (V4 also needs each sequence's window blocks). Returns the final normed hidden states
        [B, S, D] (padding rows are junk)."""
        return self._forward(inputs, starts, block_tables, absorb, window_tables)[0]

    @torch.inference_mode()
    def _forward(self, inputs, starts, block_tables, absorb, window_tables=None, images=None):
        """forward -> (h [B, S, D], what MTP reads (h for V3; V4: the last block's residual
        streams), the cache view it ran with (MTP reuses a decode's)). images[b]: sequence
        b's PromptImages, whose features replace the embeddings of the positions they cover."""
        if isinstance(self.cache, PagedV4Cache):
            return self._forward_v4(inputs, starts, block_tables, window_tables)
        lens = [len(r) for r in inputs]
        view = BatchView(self.cache, block_tables, starts, lens, absorb)
        self.forwards += 1
        if images is not None:
            embeds = self.vision.embed(self._pad(inputs), starts, lens, images)
            h = self.vision.hidden(embeds, view.positions, view)
        else:
            h = self.model.hidden(self._pad(inputs), view.positions, view)
        return h, h, view

    def _forward_v4(self, inputs, starts, block_tables, window_tables):
        """DeepSeek-V4. A decode step (a token per sequence, and its draft) is one batched
        forward over a `DecodeView` (model/v4/decode.py computes a V4 layer for rows at
        different lengths). Prefill chunks run one forward per sequence (a V4 layer's state has
        one length for the whole batch: model/v4/cache.py), each over its own `SeqView`; the
        hidden states are right-padded into [B, S, ...] as the batched path returns them."""
        self.forwards += 1
        if all(len(r) <= 2 for r in inputs) and all(st > 0 for st in starts):  # decode: one batched forward
            view = DecodeView(self.cache, block_tables, window_tables, starts, [len(r) for r in inputs])
            h, streams = self.model.trunk(self._pad(inputs), view.positions, view)
            return h, streams, view
        S, hs, streams = max(len(r) for r in inputs), [], []
        for ids, start, table, window in zip(inputs, starts, block_tables, window_tables):
            view = SeqView(self.cache, table, window, start, len(ids))
            pos = torch.arange(start, start + len(ids), device=self.device)[None]
            h, st = self.model.trunk(torch.tensor([ids], dtype=torch.long, device=self.device), pos, view)
            view.commit()
            hs.append(F.pad(h[0], (0, 0, 0, S - len(ids))))
            streams.append(F.pad(st[0], (0, 0, 0, 0, 0, S - len(ids))))
        return torch.stack(hs), torch.stack(streams), None

    def mtp_view(self, block_tables, window_tables, first: list[int], lens: list[int]):
        """The cache view for MTP over lens[b] positions from first[b] (a prompt's last ones),
        reading the MTP layer's keys only from first[b] on."""
        if isinstance(self.cache, PagedV4Cache):
            return DecodeView(self.cache, block_tables, window_tables, first, lens).keys_from(first)
        return BatchView(self.cache, block_tables, first, lens, absorb=True).keys_from(first)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] -> fp32 logits [..., V]."""
        return self.model.lm_head(h).float()

    @torch.inference_mode()
    def mtp(self, h: torch.Tensor, next_ids: list[list[int]], view: BatchView, last_rows: list[int]) -> torch.Tensor:
        """MTP module 0 over h [B, S, D] (the main model's final hidden states at
        view.positions; V4: the last block's streams [B, S, hc_mult, D]), next_ids [B][S] the
        tokens one further on. Fills the MTP layer's
        cache through `view`; returns fp32 logits [B, V] of each sequence's row last_rows[b]
        (its draft for the token after next)."""
        out = self.model.mtp_hidden(0, h, self._pad(next_ids), view.positions, view)
        # the shared head runs only on the rows whose draft we keep
        last = out[torch.arange(len(last_rows), device=out.device), torch.tensor(last_rows, device=out.device)]
        return self.model.mtp_logits(0, last[:, None])[:, 0].float()  # (V4's head mixes streams [B, S, n, D])
