"""The optimizer of a training run: AdamW, or DeepSeek-V4's Muon for the hidden matrices with AdamW for the rest.

`build_optimizer(model, cfg)` returns one `torch.optim.Optimizer` (so the schedule, the
gradient clipping, `zero_grad`, the gradient scaler, `state_dict` and DCP's sharded
checkpoints see a single optimizer whatever `cfg.optimizer` is) and the ownership report:
which parameters each algorithm updates, by name pattern and count.

`--optimizer muon` follows the V4 report (§2.4, Algorithm 1; §4.2.2):
  * Muon updates every matrix except the embedding, the prediction head(s), the RMSNorm
    weights and the mHC's static biases and gating factors, which stay on AdamW; so do
    every other vector (biases, attention sinks) and V4's compressor position biases
    (learned additive biases, not maps). The MoE router's affinity matrix is a matrix the
    report does not except: Muon updates it, without weight decay (nanoseek never decays
    the router). Each routed expert is its own 2-D matrices, so Muon orthogonalises each
    expert independently, as V4 does; a fused 3-D parameter is refused.
  * Nesterov momentum μ = 0.95, decoupled weight decay (the run's `weight_decay`, applied
    as W·(1 - ηλ)), and each update matrix rescaled to RMS γ = 0.18,
    O = NS(·)·sqrt(max(n, m))·γ, so that Muon runs on AdamW's learning rate and schedule.
  * Hybrid Newton-Schulz: 10 iterations, 8 with (3.4445, -4.7750, 2.0315) that pull the
    singular values quickly towards 1, then 2 with (2, -1.5, 0.5) that settle them at 1.

What torch 2.13's `torch.optim.Muon` already does is reused (its validation, its momentum
buffers, its Nesterov arithmetic: an EMA buffer, which differs from the report's sum only
by the factor 1 - μ that the Frobenius normalisation removes). What it lacks is written
here: the two-phase Newton-Schulz (torch takes one coefficient triple for every step),
γ = 0.18 (torch's "match_rms_adamw" is Moonlight's 0.2), same-shape matrices stacked into
one batched iteration (§3.5.1), and DTensor parameters (FSDP2, tensor parallel): their
update is all-gathered, orthogonalised whole on every rank (the same numbers everywhere)
and each rank keeps its shard. V4 instead gives each rank whole matrices to update; the
gather is the simple choice at nanoseek's sizes.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import Tensor, nn

from nanoseek.train.config import OPTIMIZERS

MUON_MOMENTUM = 0.95  # V4 report §4.2.2
MUON_UPDATE_RMS = 0.18  # γ: the RMS of every update matrix, AdamW's scale (§4.2.2)
# (a, b, c) of eq. 28 and how many iterations use them (§2.4)
HYBRID_NS = (((3.4445, -4.7750, 2.0315), 8), ((2.0, -1.5, 0.5), 2))
NS_EPS = 1e-7


# ------------------------------------------------------------------ who updates what
def is_router(name: str) -> bool:
    """The MoE's expert-affinity matrix (`*.gate.weight`)."""
    return name == "gate.weight" or name.endswith(".gate.weight")


def param_groups(model: nn.Module, weight_decay: float, skip: frozenset = frozenset()) -> list[dict]:
    """AdamW's groups: decay the matrices of linear layers; not norms, biases, embeddings or
    the router (`*.gate.weight`, the MoE's expert-affinity matrix). `skip`: ids of
    parameters another optimizer owns."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings and not is_router(name) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_owns(name: str, p: Tensor, embeddings: set[int]) -> bool:
    """Whether Muon updates `name` (V4 report §2.4): a matrix that is not the embedding, a
    prediction head (`lm_head`, PPO's `value_head`) or a learned position bias; vectors
    (norms, biases, sinks, the mHC's static biases and gates) stay on AdamW."""
    if p.ndim > 2:
        raise ValueError(f"training option 'optimizer': muon orthogonalises each matrix, and "
                         f"{name} is a fused {p.ndim}-D parameter {tuple(p.shape)}; store it as "
                         "2-D matrices (one per expert) or use --optimizer adamw")
    return (p.ndim == 2 and id(p) not in embeddings and not name.endswith("head.weight")
            and not name.endswith("position_bias"))


def ownership(model: nn.Module, optimizer: str) -> dict[str, list[str]]:
    """{"muon": [names], "adamw": [names]} of the trainable parameters (muon empty for adamw)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    owners: dict[str, list[str]] = {"muon": [], "adamw": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            muon = optimizer == "muon" and muon_owns(name, p, embeddings)
            owners["muon" if muon else "adamw"].append(name)
    return owners


def ownership_report(model: nn.Module, owners: dict[str, list[str]]) -> dict:
    """Per algorithm: tensors, parameters, and the names with layer/expert numbers folded
    into `*` ({"model.layers.*.mlp.experts.*.up_proj.weight": 48, ...})."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return {kind: {"tensors": len(names), "parameters": sum(sizes[n] for n in names),
                   "names": dict(Counter(re.sub(r"\.\d+(?=\.)", ".*", n) for n in names))}
            for kind, names in owners.items() if names}


# ------------------------------------------------------------------ Newton-Schulz
def _mm(bias: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float = 1.0) -> Tensor:
    """beta * bias + alpha * a @ b, for one matrix (addmm) or a stack (baddbmm)."""
    if a.ndim == 2:
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)


def hybrid_newton_schulz(m: Tensor, schedule=HYBRID_NS, eps: float = NS_EPS) -> Tensor:
    """U Vᵀ of M = U Σ Vᵀ, approximately, for a matrix or a stack of them (..., n, m): M/‖M‖_F,
    then eq. 28, M_k = a M + b (M Mᵀ) M + c (M Mᵀ)² M, with each phase's (a, b, c). In bf16,
    as torch.optim.Muon runs it (the V4 report: stable in BF16); on the wide orientation,
    so M Mᵀ is the smaller Gram matrix."""
    x = m.to(torch.bfloat16, copy=True)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    norm = x.norm() if x.ndim == 2 else x.norm(dim=(-2, -1), keepdim=True)
    x.div_(norm.clamp(min=eps))
    for (a, b, c), steps in schedule:
        for _ in range(steps):
            gram = x @ x.mT
            x = _mm(x, _mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def orthogonalize(updates: list[Tensor], schedule=HYBRID_NS, eps: float = NS_EPS) -> list[Tensor]:
    """hybrid_newton_schulz of each update. Same-shape matrices (a transposed one counts as
    the same) run as one stack; a DTensor update is gathered whole first and comes back as
    a DTensor with its own placements (each rank keeps its shard of the same result)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = [u.full_tensor() if isinstance(u, DTensor) else u for u in updates]
    wide = [w.mT if w.size(0) > w.size(1) else w for w in whole]
    by_shape: dict[tuple, list[int]] = {}
    for i, w in enumerate(wide):
        by_shape.setdefault((tuple(w.shape), w.device), []).append(i)
    out: list[Tensor | None] = [None] * len(updates)
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = hybrid_newton_schulz(whole[idx[0]], schedule, eps)
            continue
        ortho = hybrid_newton_schulz(torch.stack([wide[i] for i in idx]), schedule, eps)
        for i, o in zip(idx, ortho):
            out[i] = o.mT if whole[i].size(0) > whole[i].size(1) else o
    for i, u in enumerate(updates):
        if isinstance(u, DTensor):
            out[i] = distribute_tensor(out[i], u.device_mesh, u.placements, src_data_rank=None)
    return out


# ------------------------------------------------------------------ the optimizers
class HybridMuon(torch.optim.Muon):
    """torch.optim.Muon (its checks, momentum buffers and Nesterov step) with the V4
    report's update: hybrid Newton-Schulz (`ns_schedule`), RMS rescaled to `update_rms`,
    same-shape matrices stacked, DTensor parameters gathered per matrix."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = MUON_MOMENTUM,
                 update_rms: float = MUON_UPDATE_RMS, ns_schedule=HYBRID_NS, eps: float = NS_EPS):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                         ns_coefficients=ns_schedule[0][0], ns_steps=sum(n for _, n in ns_schedule),
                         eps=eps)
        self.defaults.update(update_rms=update_rms, ns_schedule=ns_schedule)
        for group in self.param_groups:
            group.setdefault("update_rms", update_rms)
            group.setdefault("ns_schedule", ns_schedule)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            updates = []
            for g, buf in zip(grads, bufs):  # torch's Nesterov momentum, verbatim
                buf.lerp_(g, 1 - mu)
                updates.append(g.lerp(buf, mu) if group["nesterov"] else buf)
            for p, o in zip(params, orthogonalize(updates, group["ns_schedule"], group["eps"])):
                scale = lr * (group["update_rms"] * math.sqrt(max(p.shape[-2:])))
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=-scale)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over Muon's groups and AdamW's (`group["optimizer"]` says which): each
    group is stepped by its algorithm, and both share this optimizer's state, so one
    state_dict (and one DCP checkpoint) holds both, keyed like any torch optimizer's."""

    def __init__(self, muon: HybridMuon | None, adamw: torch.optim.AdamW | None):
        self._parts = {k: opt for k, opt in (("muon", muon), ("adamw", adamw)) if opt is not None}
        groups = []
        for kind, opt in self._parts.items():
            for group in opt.param_groups:
                group["optimizer"] = kind
                groups.append(group)
        super().__init__(groups, {})
        self._link()

    def _link(self) -> None:
        """Point each algorithm at this optimizer's groups and state (again after a load,
        which replaces both)."""
        for kind, opt in self._parts.items():
            opt.param_groups = [g for g in self.param_groups if g["optimizer"] == kind]
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._parts.values():
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [g.get("optimizer") for g in state_dict["param_groups"]]
        mine = [g["optimizer"] for g in self.param_groups]
        if saved != mine:
            raise ValueError(f"the checkpoint's optimizer state has groups {saved}, this run's "
                             f"optimizer {mine}: resume with the optimizer the run was started with")
        super().load_state_dict(state_dict)
        self._link()


def build_optimizer(model: nn.Module, cfg, fused: bool | None = None) -> tuple[torch.optim.Optimizer, dict]:
    """(the optimizer `cfg.optimizer` names, its ownership report). adamw: torch's AdamW over
    `param_groups`, exactly as before Muon existed; muon: MuonAdamW (module docstring)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"training option 'optimizer': must be one of {' | '.join(OPTIMIZERS)}, "
                         f"got {cfg.optimizer!r}")
    owners = ownership(model, cfg.optimizer)
    report = {"optimizer": cfg.optimizer, **ownership_report(model, owners)}
    adamw_kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw_kw), report
    named = dict(model.named_parameters())
    matrices = [named[n] for n in owners["muon"] if not is_router(n)]
    routers = [named[n] for n in owners["muon"] if is_router(n)]
    muon_groups = [g for g in ({"params": matrices, "weight_decay": cfg.weight_decay},
                               {"params": routers, "weight_decay": 0.0}) if g["params"]]
    skip = frozenset(id(named[n]) for n in owners["muon"])
    adamw_groups = [g for g in param_groups(model, cfg.weight_decay, skip) if g["params"]]
    muon = HybridMuon(muon_groups, lr=cfg.lr, weight_decay=cfg.weight_decay) if muon_groups else None
    adamw = torch.optim.AdamW(adamw_groups, **adamw_kw) if adamw_groups else None
    return MuonAdamW(muon, adamw), report
