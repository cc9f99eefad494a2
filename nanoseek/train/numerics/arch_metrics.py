"""Per-architecture training metrics: what V3.2's indexer, V4's hash layers and V4's mHC do, step by step.

Three mechanisms have no loss curve of their own to watch, so the loop logs one number each
(metrics.jsonl and the progress line), and only for a model that has them (a V3 run's
records keep their old fields):

  * `indexer_kl`: the lightning indexer's KL to the main attention (DeepSeek-V3.2 §2.1.1),
        L_I = mean_t KL(p_{t,S} || Softmax(I_{t,S})),   p_t = Σ_heads attention_t, L1-normalised,
    the mean over the layers' indexers, without `indexer_loss_coef`. It falls as the indexer
    learns to rank the keys the main attention uses; in sparse training it is measured on
    the selected set S_t only.
  * `hash_max_load`: per hash-routed MoE layer (DeepSeek-V4 §2.1: experts = tid2eid[token id],
    a frozen table), the busiest expert's tokens / the mean tokens per expert over the step.
    1 is a perfect balance. Nothing trains the choice, so it shows how evenly the corpus's
    token frequencies spread over the table (the learned layers' balance is `max_violation`).
  * `mhc_comb_error`: how far Sinkhorn-Knopp left the hyper-connections' residual mixing
    from the Birkhoff polytope (DeepSeek-V4 §2.2), the max over layers of
        max(|comb·1 - 1|, |1ᵀcomb - 1|)
    (`doubly_stochastic_error`, model/v4/hyper_connections.py). comb is doubly stochastic,
    hence non-expansive, only up to this; a value that grows means hc_sinkhorn_iters is too
    few for the logits the mixing has learnt.

How they are read: the modules keep their last training forward's value (the indexer its
detached `kl`, HyperConnection its `comb_error`) and the MoE its `tokens_per_expert`; the
loop adds each micro-batch's indexer KL and comb error as its share of the step, 1 /
(micro-batches x data-parallel ranks), so the logged value is their mean over the step, and
reads the hash layers' loads once, after every rank's are summed and before the bias update
clears them. All of it stays on the device: read back with the rest of the interval's metrics.
"""

from __future__ import annotations

import torch
from torch import nn


class ArchMetrics:
    """The modules behind the per-architecture metrics of one model, found once."""

    def __init__(self, model: nn.Module):
        modules = list(model.modules())
        # the V3.2 / V4 indexers keep their last loss (model/dsa.py, model/v4/indexer.py);
        # V4's hyper-connections their comb's error (a model-wide method of the same name is
        # not one of them)
        self.indexers = [m for m in modules if _holds(m, "indexer_loss")]
        self.hyper_connections = [m for m in modules if _holds(m, "comb_error")]
        self.hash_moes = [m for m in modules if getattr(m, "is_hash", False) is True
                          and _holds(m, "tokens_per_expert")]

    def __bool__(self) -> bool:
        return bool(self.indexers or self.hyper_connections or self.hash_moes)

    def forward_shares(self, share: float) -> dict:
        """After a micro-batch's forward: its indexer KL and comb error, times `share`."""
        out = {}
        kls = [k for k in map(indexer_kl, self.indexers) if k is not None]
        if kls:
            out["indexer_kl"] = torch.stack(kls).mean() * share
        errors = [m.comb_error for m in self.hyper_connections if m.comb_error is not None]
        if errors:
            out["mhc_comb_error"] = torch.stack([e.detach().float() for e in errors]).amax() * share
        return out

    def step(self) -> dict:
        """After the step's backward (loads summed over ranks), before the bias update."""
        if not self.hash_moes:
            return {}
        return {"hash_max_load": torch.stack([max_over_mean(m.tokens_per_expert) for m in self.hash_moes])}


def _holds(module: nn.Module, name: str) -> bool:
    """The module keeps a tensor (or None, before its first forward) under `name`."""
    value = getattr(module, name, 0)
    return value is None or torch.is_tensor(value)


def indexer_kl(indexer: nn.Module) -> torch.Tensor | None:
    """L_I of an indexer's last training forward, detached, without its coefficient: its
    `kl` where it keeps one (V3.2's), else `indexer_loss` / `loss_coef` (V4's)."""
    kl = getattr(indexer, "kl", None)
    if torch.is_tensor(kl):
        return kl.detach().float()
    loss, coef = indexer.indexer_loss, getattr(indexer, "loss_coef", 1.0)
    if loss is None or not coef:
        return None
    return loss.detach().float() / coef


def max_over_mean(load: torch.Tensor) -> torch.Tensor:
    """The busiest expert's load / the mean load (0 for a layer that saw no token)."""
    load = load.float()
    mean = load.mean()
    return torch.where(mean > 0, load.max() / mean.clamp(min=1e-12), torch.zeros_like(mean))


def progress_fields(record: dict) -> dict:
    """Short fields for the progress line from a metrics record (only those it holds)."""
    out = {}
    if record.get("indexer_kl") is not None:
        out["idx_kl"] = f"{record['indexer_kl']:.3f}"
    if record.get("hash_max_load"):
        out["hash_load"] = f"{max(record['hash_max_load']):.2f}"
    if record.get("mhc_comb_error") is not None:
        out["comb_err"] = f"{record['mhc_comb_error']:.1e}"
    return out
