"""DeepSeekMoE: always-on shared experts plus fine-grained routed experts.

Routing, V3 (`noaux_tc`): s = sigmoid(W_g h); experts are *chosen* with s + b, where b is
`e_score_correction_bias`, a buffer moved by the aux-loss-free update rather than by
gradients. Groups are scored by the sum of their top-2 (s + b), only `topk_group` groups
stay eligible, and the top `num_experts_per_tok` experts among them are taken. The gating
weights are the chosen s (not s + b), normalised when `norm_topk_prob`, times
`routed_scaling_factor`.

Routing, V2: softmax scores; `greedy` top-k, or `group_limited_greedy` (group score = the
group's max). No bias. The gating weights are the chosen scores either normalised (when
`norm_topk_prob`) or times `routed_scaling_factor`, never both, as in DeepSeek-V2's code.

Routing, V4 (§2.1): s = sqrt(softplus(W_g h)) ("sqrtsoftplus"), chosen with s + b as V3 but
over all experts (no groups); weights normalised and scaled as V3. The first layers
(`mlp_layer_types` "hash_moe") choose by a frozen table instead, experts = tid2eid[token id]
(Roller et al.'s hash layers): no bias and nothing for the balance loss to move, but the
chosen experts are still weighted by the learned gate's normalised, scaled s. V4's experts,
routed and shared, clamp their SwiGLU inputs (`swiglu_limit`, mlp.py). DeepSeek's reference
clamps the shared expert too (MoE.__init__: Expert(..., swiglu_limit=args.swiglu_limit)), as
transformers 5.25's DeepseekV4MLP does (earlier transformers did not: its issue #46018).

Dispatch sorts token-slots by expert, runs every expert once on its contiguous slice
(skipping experts that got no tokens) and scatter-adds the weighted outputs back. At inference
on a CPU the engine stacks the experts' weights (expert_stack.py) so that the slices go through
two grouped GEMMs rather than a Python loop over the experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.expert_stack import ExpertStack
from nanoseek.model.mlp import MLP


class Gate(nn.Module):
    runs_in_fp32 = True  # bf16 training keeps the router's weight fp32 (train/numerics/bf16_weights.py)

    def __init__(self, cfg: ModelConfig, layer_id: int | None = None):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.layer_id = layer_id
        self.hash = layer_id is not None and cfg.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.hash:  # frozen token id -> experts table; a checkpoint's, or _init_weights'
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.top_k, dtype=torch.long))
            self.e_score_correction_bias = None
        elif self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None):
        """x [N, D] -> weights [N, k] (fp32), indices [N, k], scores [N, E], logits [N, E].
        input_ids [N] (hash layers only) pick the experts. The router runs in fp32 whatever
        the activation dtype, as DeepSeek does; autocast is switched off here, or it would
        run this linear in bf16 despite the casts."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = self._score(logits)
        if self.hash:
            if input_ids is None:
                raise ValueError(f"hash-routed MoE layer {self.layer_id}: the experts come from "
                                 "tid2eid[input_ids], and no input_ids were given")
            indices = self.tid2eid[input_ids.reshape(-1)].long()  # DeepSeek ships it int32
            return self._gating_weights(scores.gather(1, indices)), indices, scores, logits
        choice = scores.detach()
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            choice = self._limit_groups(choice)
        indices = choice.topk(self.top_k, dim=-1)[1]
        return self._gating_weights(scores.gather(1, indices)), indices, scores, logits

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        """s = σ(z) (V3), softmax(z) (V2), or sqrt(softplus(z)) (V4: positive, unbounded
        above, and growing like sqrt(z) rather than saturating as σ does).

        sqrtsoftplus floors softplus at fp32's smallest normal number before the sqrt: below
        z ≈ -103 softplus underflows to 0, and sqrt's backward, 1 / (2 sqrt(0)) = inf, times
        the incoming gradient would make NaN (inf · 0 for an expert nobody chose, which the
        balance loss still differentiates). The floor passes no gradient there; above
        z ≈ -87 it changes nothing. Logits are fp32 here (forward)."""
        if self.scoring_func == "sigmoid":
            return logits.sigmoid()
        if self.scoring_func == "sqrtsoftplus":
            return F.softplus(logits).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        return logits.softmax(dim=-1)

    def _gating_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """V3 (noaux_tc) and V4 normalise the chosen sigmoid / sqrtsoftplus scores when
        `norm_topk_prob` and always multiply by `routed_scaling_factor`. V2 does one or the
        other: with `norm_topk_prob` (and k > 1) the chosen softmax scores are normalised to
        sum to 1 and *not* scaled, otherwise they are scaled (DeepSeek-V2's
        modeling_deepseek.py, MoEGate.forward)."""
        per_token = self.scoring_func != "softmax"  # scores not normalised over the experts
        if not (self.norm_topk_prob and (per_token or self.top_k > 1)):
            return weights * self.route_scale
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale if per_token else weights

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask (-inf) every expert outside the topk_group best groups."""
        grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(self.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)


def hash_table(cfg: ModelConfig, layer_id: int) -> torch.Tensor:
    """tid2eid [vocab_size, k] for a hash layer born in nanoseek: each token id gets k distinct
    experts drawn uniformly, from a generator seeded by the layer, so the table is the same
    on every rank and every run (it is frozen: never trained, saved with the weights)."""
    g = torch.Generator().manual_seed(0x7E1D + layer_id)
    noise = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g)
    return noise.topk(cfg.num_experts_per_tok, dim=-1)[1]


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, n_experts: int,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-wise balance loss of V3 (Eq. 17-20), without α:
        Σ_i f_i P_i,  f_i = N_r/(K_r·T)·#{t routed to i},  P_i = mean_t s_{i,t}/Σ_j s_{j,t},
    averaged over sequences. `batch` = 1 gives the batch-wise (V2) form. token_mask [N]
    (True = a real token): T, the counts and the means then cover the real tokens only."""
    k = indices.shape[-1]
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, -1, n_experts)
    real = (torch.ones_like(probs[..., 0]) if token_mask is None
            else token_mask.view(batch, -1).to(probs.dtype))         # [batch, T]
    counts = torch.zeros(batch, n_experts, device=scores.device)
    counts.scatter_add_(1, indices.view(batch, -1), real.repeat_interleave(k, dim=1))
    if token_mask is None:  # every token real: the plain form, bit for bit
        f = counts * (n_experts / (k * probs.shape[1]))
        return (f * probs.mean(dim=1)).sum(dim=-1).mean()
    T = real.sum(dim=1, keepdim=True).clamp(min=1)
    f = counts * n_experts / (k * T)
    return (f * (probs * real.unsqueeze(-1)).sum(dim=1) / T).sum(dim=-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int | None = None):
        """layer_id: the block's index, which V4 needs to know whether its router hashes."""
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg, layer_id)
        self.is_hash = self.gate.hash
        limit = cfg.swiglu_limit  # V4 clamps the SwiGLU of every expert, the shared one too
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size, limit)
                                     for _ in range(self.n_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, limit)
                               if cfg.n_shared_experts else None)
        # Tokens routed to each expert since the last bias update (the step's load). Counted
        # in training mode only, like BatchNorm's running statistics: evaluation, sampling and
        # a frozen reference model (eval mode) leave the bias update as training made it.
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.expert_stack: ExpertStack | None = None  # the experts as grouped GEMMs (expert_stack.py)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, D]. token_mask [B, S] (True = a real token; None = all are): padding is
        routed and computed like any token, but left out of the load that moves the bias
        and of the balance and z-losses (padding tokens are alike, so they would all load
        the same experts). input_ids [B, S]: the tokens, which a hash layer routes by.
        A hash layer's load is counted (for the logs) but it has no balance or z-loss:
        its choice is fixed, and the bias update skips it (no bias)."""
        shape = x.shape
        if token_mask is not None and token_mask.shape != shape[:-1]:
            raise ValueError(f"MoE token_mask: shape {tuple(token_mask.shape)} does not match the "
                             f"tokens {tuple(shape[:-1])} (a padded layout's cache reached a layer "
                             "that sees other positions, e.g. an MTP module)")
        if input_ids is not None and input_ids.shape != shape[:-1]:
            raise ValueError(f"MoE input_ids: shape {tuple(input_ids.shape)} does not match the "
                             f"tokens {tuple(shape[:-1])}")
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores, logits = self.gate(flat, input_ids)
        y = self.dispatch(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        real = None if token_mask is None else token_mask.reshape(-1)
        if self.training:
            with torch.no_grad():
                counted = indices if real is None else indices[real]
                self.tokens_per_expert += torch.bincount(counted.flatten(), minlength=self.n_experts)
        learned = self.training and not self.is_hash
        self.aux_loss = self._aux_loss(scores, indices, logits, shape[0], real) if learned else None
        return y.view(shape)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sort token-slots by expert, run each expert once on its slice, scatter-add back.
        On a CPU in bf16 / fp16 each slice is padded to a few fixed lengths (`padded_rows`).
        Without autograd and with the experts stacked (`expert_stack`), the slices go through
        two grouped GEMMs instead of a loop over the experts: the same products."""
        n_tokens, flat_idx = x.shape[0], indices.flatten()
        order = flat_idx.argsort(stable=True)
        token_of_slot = order // self.top_k
        slot_weights = weights.flatten()[order].to(x.dtype)
        counts = torch.bincount(flat_idx, minlength=self.n_experts)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            token_of_slot, slot_weights, counts = pad_slots(token_of_slot, slot_weights, counts,
                                                            pad_token=n_tokens)
            x = torch.cat([x, x.new_zeros(1, x.shape[1])])  # the padding slots read this row
        stack = self.expert_stack
        if stack is not None and stack.usable():
            out = stack(x[token_of_slot], counts)
        else:
            counts = counts.tolist()
            # split (not slicing) so the backward concatenates instead of zero-filling per expert
            chunks = x[token_of_slot].split(counts)
            out = torch.cat([self.experts[e](chunk) for e, chunk in enumerate(chunks) if counts[e]])
        return torch.zeros_like(x).index_add_(0, token_of_slot, out * slot_weights.unsqueeze(-1))[:n_tokens]

    def _aux_loss(self, scores, indices, logits, batch, real=None) -> torch.Tensor | None:
        cfg, loss = self.cfg, None
        if cfg.aux_loss_alpha > 0:
            loss = cfg.aux_loss_alpha * balance_loss(scores, indices, batch if cfg.seq_aux else 1,
                                                     self.n_experts, real)
        if cfg.router_z_loss_coef > 0:  # ST-MoE's z-loss keeps router logits small
            z2 = torch.logsumexp(logits, dim=-1).square()
            z = cfg.router_z_loss_coef * (z2.mean() if real is None else (z2 * real).sum() / real.sum().clamp(min=1))
            loss = z if loss is None else loss + z
        return loss

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing (V3 §2.1.2): b_i += γ·sign(mean load − load_i), then
        start counting the next step. Called after each optimiser step."""
        load = self.tokens_per_expert
        bias = self.gate.e_score_correction_bias
        if bias is not None and gamma > 0 and load.sum() > 0:
            bias += gamma * torch.sign(load.mean() - load)
        load.zero_()


PAD_ROWS = 32  # slices longer than this are padded to a multiple of it, shorter to a power of 2


def padded_rows(count: torch.Tensor) -> torch.Tensor:
    """The length each expert's slice is padded to: 0 stays 0; up to PAD_ROWS the next power
    of two; beyond, the next multiple of PAD_ROWS.

    Why: on a CPU, oneDNN builds a bf16 / fp16 matmul kernel for every new shape (measured on
    the 2-core AMD EPYC: a [M, 256] x [256, 128] bf16 linear took 462 us the first time an M
    was seen, 76 us after; fp32's MKL path has no such cost). An expert's token count changes
    every step, so unpadded slices pay it again and again; a handful of lengths do not. The
    padding costs at most PAD_ROWS - 1 rows per expert (under 2x for the short slices of
    decoding, where per-call overhead dominates anyway)."""
    pow2 = torch.where(count > 0, 2 ** torch.ceil(torch.log2(count.clamp(min=1).float())), 0)
    return torch.where(count <= PAD_ROWS, pow2.long(), (count + PAD_ROWS - 1) // PAD_ROWS * PAD_ROWS)


def pad_slots(token_of_slot: torch.Tensor, slot_weights: torch.Tensor, counts: torch.Tensor,
              pad_token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-slots sorted by expert -> the same slots with each expert's run padded to
    `padded_rows`. A padding slot reads token `pad_token` (a zero row the caller appends)
    with weight 0 and writes its (zero) output there, so the real tokens' outputs are the
    unpadded ones."""
    padded = padded_rows(counts)
    start, start_padded = counts.cumsum(0) - counts, padded.cumsum(0) - padded
    expert = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    pos = torch.arange(len(token_of_slot), device=counts.device) - start[expert] + start_padded[expert]
    total = int(padded.sum())
    tokens = token_of_slot.new_full((total,), pad_token).index_copy_(0, pos, token_of_slot)
    weights = slot_weights.new_zeros(total).index_copy(0, pos, slot_weights)
    return tokens, weights, padded
