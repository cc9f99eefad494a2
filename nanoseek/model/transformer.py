"""The causal LM: embeddings, blocks, final norm, output head, and the MTP modules.

Module names mirror the Hugging Face DeepseekV3 layout (`model.embed_tokens`,
`model.layers.N.*`, `model.norm`, `lm_head`) so a state dict maps 1:1 onto a checkpoint;
only the MTP modules are renamed (`mtp.k` <-> `model.layers.{num_hidden_layers + k}`).
A V4 config (`cfg.is_v4`) builds DeepSeek-V4's stack instead (model/v4/: hyper-connected
streams, hybrid attention, hash and learned MoE; names as transformers' DeepseekV4 keeps them in
memory, `model.hc_head.*`, `model.layers.N.attn_hc.*`, ...) and V4's MTP blocks (model/v4/mtp.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.checkpoint import hf
from nanoseek.config import ModelConfig
from nanoseek.model import dsa
from nanoseek.model.block import Block
from nanoseek.model.cache import Cache, ContiguousCache
from nanoseek.model.moe import Gate, MoE, hash_table
from nanoseek.model.mtp import MTPLayer
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.sampling import decode
from nanoseek.model.v4.hyper_connections import HyperConnection, HyperHead
from nanoseek.model.v4.mtp import MTPBlock
from nanoseek.model.v4.transformer import DeepseekV4Model

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate: lm + λ·mtp + balance + indexer
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None  # sequence-wise balance loss (+ z-loss), α included
    indexer_loss: torch.Tensor | None = None  # the indexers' KL losses (V3.2/V4), coef included


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV4Model(cfg) if cfg.is_v4 else DeepseekModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        L = cfg.num_hidden_layers
        mtp_cls = MTPBlock if cfg.is_v4 else MTPLayer
        self.mtp = nn.ModuleList(mtp_cls(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        # V4's attention layers build their own rotary tables (two bases, partial rope)
        self.rotary = None if cfg.is_v4 else RotaryEmbedding(cfg, cfg.qk_rope_head_dim)
        self.apply(self._init_weights)

    # ------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None,
                        quantization: str | None = None) -> CausalLM:
        """Load an HF-format checkpoint directory (nanoseek-, transformers- or
        DeepSeek-written; nanoseek/checkpoint/hf.py). quantization="fp8" keeps attention and
        FFN/expert weights in FP8 (FP8Linear)."""
        return hf.load_pretrained(cls, path, dtype=dtype, device=device, quantization=quantization)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30) -> None:
        """Write config.json + safetensors shards that transformers, vLLM and SGLang load."""
        hf.save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    def materialise_buffers(self, device=None) -> None:
        """Recreate the non-persistent buffers (the rotary tables, the experts' load
        counters), which a model built on the meta device, as loading does, lacks."""
        if self.rotary is not None:
            self.rotary = RotaryEmbedding(self.config, self.config.qk_rope_head_dim).to(device or "cpu")
        for m in self.moe_layers():
            m.tokens_per_expert = torch.zeros(m.n_experts, device=device or "cpu")

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for the linears, embeddings and routers; V4's (as
        transformers' DeepseekV4PreTrainedModel): mHC fn normal, base 0, scale 1, so comb
        starts near uniform and pre/post near σ(0); attention sinks and the compressors'
        position biases 0; a hash layer's tid2eid a fixed random table (hash_table)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, Gate) and module.hash and not module.tid2eid.is_meta:
            module.tid2eid.copy_(hash_table(self.config, module.layer_id))
        if isinstance(module, HyperConnection):
            nn.init.normal_(module.fn, mean=0.0, std=std)
            nn.init.zeros_(module.base)
            nn.init.ones_(module.scale)
        if isinstance(module, HyperHead):
            nn.init.normal_(module.hc_fn, mean=0.0, std=std)
            nn.init.zeros_(module.hc_base)
            nn.init.ones_(module.hc_scale)
        for name in ("sinks", "position_bias"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                nn.init.zeros_(getattr(module, name))

    # ------------------------------------------------------------------ forward
    def positions_for(self, input_ids: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        start = getattr(cache, "length", 0) if cache is not None else 0
        B, S = input_ids.shape
        return torch.arange(start, start + S, device=input_ids.device).expand(B, S)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               cache: Cache | None = None) -> torch.Tensor:
        """input_ids [B,S] -> final normed hidden states [B,S,D] (h^0 of V3's MTP modules)."""
        return self.trunk(input_ids, positions, cache)[0]

    def trunk(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
              cache: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B,S] -> (h [B,S,D] what lm_head reads, what the first MTP module reads):
        V3 feeds its MTP the same h; V4 feeds its MTP the last block's residual streams
        [B,S,hc_mult,D], from before the HyperHead (DeepSeek's MTPBlock)."""
        if positions is None:
            positions = self.positions_for(input_ids, cache)
        if self.config.is_v4:
            streams = self.model.streams(input_ids, positions, cache)
            return self.model.head(streams), streams
        freqs_cis = self.rotary(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, freqs_cis, cache)
        h = self.model.norm(x)
        return h, h

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        """Logits [B,S,V]."""
        return self.lm_head(self.hidden(input_ids, positions, cache))

    def mtp_hidden(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor,
                   positions: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """MTP module k (0-based): h_prev [B,S,D] at positions, tokens one further on -> h^k.
        V4: h_prev and h^k are residual streams [B,S,hc_mult,D] (`trunk`'s second output)."""
        emb = self.model.embed_tokens(next_ids)
        if self.config.is_v4:
            return self.mtp[k](h_prev, emb, positions, cache, next_ids)
        return self.mtp[k](h_prev, emb, self.rotary(positions), cache)

    def mtp_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """The shared head after MTP module k's own norm (apply it only to rows you need);
        V4: after its own HyperHead and norm."""
        if self.config.is_v4:
            return self.lm_head(self.mtp[k].head(h))
        return self.lm_head(self.mtp[k].shared_head.norm(h))

    def mtp_forward(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor,
                    positions: torch.Tensor, cache: Cache | None = None):
        """Returns (h^k [B,S,D], logits [B,S,V])."""
        h = self.mtp_hidden(k, h_prev, next_ids, positions, cache)
        return h, self.mtp_logits(k, h)

    # --------------------------------------------------------------------- loss
    def loss_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The targets each head learns from in `labels`: [main head, MTP depth 1, ...], the
        positions that are not IGNORE_INDEX (depth k predicts labels[:, k:])."""
        valid = labels != IGNORE_INDEX
        return torch.stack([valid[:, k:].sum() for k in range(len(self.mtp) + 1)])

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             num_targets: torch.Tensor | None = None, num_batches: int = 1) -> LossOutput:
        """labels[b, i] is the token after input_ids[b, i] (IGNORE_INDEX to skip).
        MTP depth k predicts labels[:, i + k] from h^{k-1}_i and input_ids[:, i + k].

        The loss of this batch as its share of an optimizer step, so that the shares of a
        step's micro-batches add up to the loss of one big batch (default: a step of one):
          * each cross-entropy (main head; MTP depth k) is the sum over its targets divided by
            `num_targets` [1 + depths], the step's targets per head (`loss_targets` summed over
            the micro-batches): every target token weighs the same, however the masks spread
            them over micro-batches (torchtitan's rule);
          * the balance and z-losses are means over a batch's sequences and tokens (the router
            sees masked tokens too), so each micro-batch's takes 1 / `num_batches`: the step's
            is their mean over the micro-batches;
          * the indexers' losses (V3.2's and V4's lightning indexers, each module's
            `indexer_loss`, set by its training forward, `indexer_loss_coef` included) are
            means too: summed over the modules, 1 / `num_batches` each micro-batch."""
        if num_targets is None:
            num_targets = self.loss_targets(labels)
        B, S = input_ids.shape
        self._clear_indexer_losses()
        positions = self.positions_for(input_ids, None)
        h, x = self.trunk(input_ids, positions)
        lm_loss = self._ce_sum(self.lm_head(h), labels) / num_targets[0].clamp(min=1)
        mtp_losses = []
        for k in range(1, len(self.mtp) + 1):
            if S - k <= 0:
                break
            x, logits = self.mtp_forward(k - 1, x[:, :S - k], input_ids[:, k:], positions[:, :S - k])
            mtp_losses.append(self._ce_sum(logits, labels[:, k:]) / num_targets[k].clamp(min=1))
        loss = lm_loss
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else None
        if mtp_loss is not None:
            loss = loss + self.config.mtp_loss_weight * mtp_loss
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() / num_batches if aux else None
        if aux_loss is not None:
            loss = loss + aux_loss
        indexer_loss = dsa.indexer_loss(self)
        if indexer_loss is not None:
            indexer_loss = indexer_loss / num_batches
            loss = loss + indexer_loss
        return LossOutput(loss, lm_loss, mtp_loss, aux_loss, indexer_loss)

    def _clear_indexer_losses(self) -> None:
        """Forget the indexer losses of earlier forwards (an evaluation-mode forward sets none,
        and must not be charged a training forward's)."""
        for m in dsa.indexers(self):
            m.indexer_loss = m.kl = None

    @staticmethod
    def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    # ---------------------------------------------------------------------- MoE
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_load(self) -> list[torch.Tensor]:
        """Tokens per expert since the last bias update, one tensor per MoE layer."""
        return [m.tokens_per_expert.clone() for m in self.moe_layers()]

    def update_router_biases(self, gamma: float | None = None) -> None:
        """The aux-loss-free bias update for every MoE layer (call after optimizer.step).
        V4's hash layers have no bias: their load counters are only reset."""
        gamma = self.config.bias_update_speed if gamma is None else gamma
        for m in self.moe_layers():
            m.update_bias(gamma)

    def comb_error(self) -> float | None:
        """V4: the largest distance from doubly stochastic (max |row or column sum - 1|) of
        any mHC comb matrix in the last training forward; None for V3 or before one."""
        errs = [m.comb_error for m in self.modules()
                if isinstance(m, HyperConnection) and m.comb_error is not None]
        return float(torch.stack(errs).max()) if errs else None

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompts of one length [B,S] -> [B, S + new]; greedy when temperature == 0 (the
        engine's sampler, `nanoseek.model.sampling`).
        Prefill decompresses; every later token attends over the latent cache (absorbed).
        Rows that produced eos keep emitting eos."""
        B, S = input_ids.shape
        cache = ContiguousCache(B, S + max_new_tokens)
        cache.absorb = False
        logits = self(input_ids, cache=cache)[:, -1]
        cache.absorb = True
        return decode(input_ids, logits, lambda ids: self(ids, cache=cache)[:, -1], max_new_tokens,
                      temperature, top_k or 0, eos_token_id, generator)

