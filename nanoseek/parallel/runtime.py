"""`Parallel`: what the training loop asks of the other processes.

The loop stays the single-process loop; a `Parallel` given to it changes five things:
  * a step's targets are counted over every DP rank (an all-reduce of each micro-batch's
    count), and the balance loss's divisor is micro-batches x dp, so each rank's loss is its
    share of the global one and the shares add up exactly as micro-batches do;
  * after the backward, dense gradients are sums over ranks (FSDP's mean undone, or, with
    replicated weights, one all-reduce) and the replicas of an expert (dp/ep of them) add
    their gradients;
  * the logged values and the expert loads are summed over DP ranks: the router biases move
    with the global load, identically on every rank;
  * the gradient norm is the global one (FSDP shards, TP shards and EP experts included)
    and per-expert norms are reported beside it;
  * step times are agreed (the max), so time limits and schedules stop every rank together.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nanoseek.parallel.data_parallel import apply_fsdp, undo_mean
from nanoseek.parallel.expert_parallel import A2ATimer, is_expert_param, shard_experts
from nanoseek.parallel.mesh import ParallelConfig, build_meshes
from nanoseek.parallel.placement import PlacementStats, routing_bound
from nanoseek.parallel.tensor_parallel import apply_tp


class Parallel:
    distributed = True  # the training state is saved sharded (DCP); one process: single.py

    def __init__(self, model: nn.Module, cfg: ParallelConfig, device: torch.device):
        world = dist.get_world_size()
        cfg.validate(world, model.config.n_routed_experts)
        if model.config.arch != "v3" and (cfg.tp > 1 or cfg.pp > 1):
            raise ValueError(f"tensor and pipeline parallelism split V3's attention and stages; a "
                             f"DeepSeek-{'V3.2' if model.config.is_v32 else 'V4'} model (arch "
                             f"{model.config.arch!r}) is not split that way yet: use --tp 1 --pp 1")
        self.cfg, self.meshes = cfg, build_meshes(cfg, device)
        self.rank, self.is_main = dist.get_rank(), dist.get_rank() == 0
        self.dp, self.ep, self.tp = cfg.dp(world), cfg.ep, cfg.tp
        # under PP a stage calls its blocks itself, outside the model's forward: DP replicates
        self.replicate = cfg.replicate or cfg.pp > 1
        self.dp_group = self.meshes.group("dp")
        self.stats = None
        c = model.config
        if self.tp > 1:  # torchtitan's order: TP, then EP, then FSDP
            apply_tp(model, self.meshes.dense["tp"])
        if self.ep > 1:
            self.stats = PlacementStats(c.n_routed_experts, self.ep, routing_bound(
                c.n_routed_experts, c.num_experts_per_tok, c.n_group or 1, c.topk_group or 1, self.ep))
            for moe in model.moe_layers():
                shard_experts(moe, self.meshes.group("ep"), self.stats)
        # routed experts stay out of FSDP: an expert that got no token on one rank has no
        # gradient there, and FSDP's reduce-scatter needs the same tensors on every rank
        self.expert_params = {id(p) for n, p in model.named_parameters() if is_expert_param(n)}
        if self.dp > 1 and not self.replicate:
            apply_fsdp(model, self.meshes.dense["dp"])
        self.model, self.device = model, device
        self.expert_grad_stats: dict = {}
        self.pp, self.pipeline = cfg.pp, None  # built at the first step (it needs grad_accum)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (its share of a batch's rows)."""
        return self.meshes.local_rank("dp")

    # ------------------------------------------------------- pipeline parallel
    def owns(self, name: str) -> bool:
        """Whether this rank trains (and checkpoints) `name`: with pp > 1 only its stage's."""
        if self.pp == 1:
            return True
        from nanoseek.parallel.pipeline import stage_owns
        return stage_owns(name, self.model, self.pp, self.meshes.local_rank("pp"))

    def pipeline_step(self, batches: list, targets) -> dict:
        """The step's forward and backward through the 1F1B schedule (pp > 1); each DP
        rank's pipeline runs its own rows, its balance losses a share of micro-batches x dp."""
        if self.pipeline is None:
            from nanoseek.parallel.pipeline import Pipeline
            self.pipeline = Pipeline(self.model, self.meshes.group("pp"), self.device,
                                     batches[0][0], len(batches))
        return self.pipeline.step(batches, dataclasses.replace(
            targets, micro_batches=targets.micro_batches * self.dp))

    # ------------------------------------------------------------ the loss
    def local_rows(self, batch: tuple) -> tuple:
        """This DP rank's rows of a global batch (rank r takes the r-th slice)."""
        r = self.meshes.local_rank("dp")
        return tuple(t[r * t.shape[0] // self.dp:(r + 1) * t.shape[0] // self.dp] for t in batch)

    def wrap_count(self, count_targets):
        def count(batch):
            c = count_targets(batch).clone()
            dist.all_reduce(c, group=self.dp_group)
            return c
        return count

    def wrap_loss(self, loss_fn):
        def loss(model, batch, targets):
            return loss_fn(model, batch, dataclasses.replace(
                targets, micro_batches=targets.micro_batches * self.dp))
        return loss

    # ------------------------------------------------------- after backward
    @torch.no_grad()
    def after_backward(self, model: nn.Module, sums: dict) -> dict:
        """Gradients as sums over ranks; the step's logged values and expert loads summed
        over DP ranks (one all-reduce each)."""
        params = [p for p in model.parameters() if p.requires_grad]
        dense = [p for p in params if id(p) not in self.expert_params]
        if self.dp > 1 and self.replicate:
            self._sum_grads(dense, self.dp_group)
        elif self.dp > 1:
            undo_mean(dense, self.dp)
        if self.dp // self.ep > 1:  # replicas of the same experts (all of them when ep = 1)
            self._sum_grads([p for p in params if id(p) in self.expert_params],
                            self.meshes.group("edp"))
        keys = [k for k, v in sums.items() if torch.is_tensor(v)]
        values = [sums[k].float() for k in keys]
        self._all_reduce(values, self.dp_group)
        loads = [m.tokens_per_expert for m in model.moe_layers()]
        self._all_reduce(loads, self.dp_group)
        if self.pp > 1:  # each layer counted on its own stage: every rank gets every load
            self._all_reduce(loads, self.meshes.group("pp"))
        return {**sums, **dict(zip(keys, values))}

    def _sum_grads(self, params: list[nn.Parameter], group) -> None:
        """Each gradient summed over `group`, which holds replicas of `params`. A parameter
        may have no gradient on some ranks (an expert that got no token there; under PP,
        other stages' layers have none anywhere): the ranks first agree which have one
        somewhere, those get zeros where missing, and the rest stay None, as they would in
        one process (so AdamW leaves them alone alike)."""
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
        summed = [p for p, h in zip(params, has.tolist()) if h]
        for p in summed:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce([p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                          for p in summed], group)

    @staticmethod
    def _all_reduce(tensors: list[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
        """In place, as one flat all-reduce."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=op, group=group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    # ------------------------------------------------------------- clipping
    @torch.no_grad()
    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm, clipped to max_norm when > 0."""
        grads = [p.grad for p in params if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
        sq = sq + self._dtensor_sq([g for g in grads if isinstance(g, DTensor)]).to(sq.device)
        experts = [p.grad for p in params if p.grad is not None and id(p) in self.expert_params]
        expert_sq = sum((g.double().square().sum() for g in experts), torch.zeros_like(sq))
        if self.ep > 1:
            dist.all_reduce(expert_sq, group=self.meshes.group("ep"))
        expert_ids = {id(g) for g in experts}
        plain = [g for g in grads if not isinstance(g, DTensor) and id(g) not in expert_ids]
        sq = sq + expert_sq + sum((g.double().square().sum() for g in plain), torch.zeros_like(sq))
        if self.pp > 1:  # each stage its own parameters; the embedding counted once
            emb = self.model.model.embed_tokens.weight.grad
            if self.meshes.local_rank("pp") > 0 and emb is not None:
                sq = sq - emb.double().square().sum()
            dist.all_reduce(sq, group=self.meshes.group("pp"))
        norm = sq.sqrt().float()
        self.expert_grad_stats = self._expert_norms()
        if max_norm > 0:
            coef = min(1.0, max_norm / (float(norm) + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm

    @staticmethod
    def _dtensor_sq(grads: list) -> torch.Tensor:
        """Σ‖g‖² over DTensor gradients: local shards squared, summed over the mesh
        dimensions each is sharded on (replicated dimensions count once)."""
        total = torch.zeros((), dtype=torch.float64)
        by_dims: dict = {}
        for g in grads:
            dims = tuple(i for i, pl in enumerate(g.placements)  # Shard, _StridedShard
                         if not (pl.is_replicate() or pl.is_partial()))
            local = g.to_local().double().square().sum().cpu()
            key = (id(g.device_mesh), dims)
            mesh_sq = by_dims.setdefault(key, [g.device_mesh, dims, torch.zeros((), dtype=torch.float64)])
            mesh_sq[2] += local
        for mesh, dims, s in by_dims.values():
            s = s.to(mesh.device_type)
            for d in dims:
                dist.all_reduce(s, group=mesh.get_group(d))
            total += s.cpu()
        return total

    def _expert_norms(self) -> dict:
        """Per-expert gradient norms over every MoE layer: max, mean and min over experts."""
        norms = []
        for moe in self.model.moe_layers():
            row = torch.zeros(moe.n_experts, dtype=torch.float64, device=self.device)
            for key, expert in moe.experts.named_children():
                sq = sum(float(p.grad.double().square().sum()) for p in expert.parameters()
                         if p.grad is not None)
                row[int(key)] = sq
            norms.append(row)
        if not norms:
            return {}
        sq = torch.stack(norms)
        if self.ep > 1:
            dist.all_reduce(sq, group=self.meshes.group("ep"))
        if self.pp > 1:
            dist.all_reduce(sq, group=self.meshes.group("pp"))
        n = sq.sqrt()
        return {"expert_grad_norm_max": n.max(), "expert_grad_norm_mean": n.mean(),
                "expert_grad_norm_min": n.min()}

    # --------------------------------------------------------------- metrics
    def step_metrics(self) -> dict:
        """Placement and all-to-all figures of the step, summed over ranks."""
        out = dict(self.expert_grad_stats)
        if self.stats is None:
            return out
        sums, most = self.stats.totals()
        sums = sums.to(self.device)
        a2a = torch.tensor([A2ATimer.take()], dtype=torch.float64, device=self.device)
        most_t = torch.tensor([float(most)], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums, group=self.dp_group)
        dist.all_reduce(most_t, op=dist.ReduceOp.MAX, group=self.dp_group)
        dist.all_reduce(a2a, op=dist.ReduceOp.MAX, group=self.dp_group)
        s = self.stats.summarize(sums.cpu(), int(most_t))
        out.update({k: torch.tensor(v, dtype=torch.float64) for k, v in s.items()})
        out["a2a_s"] = a2a[0]
        return out

    def global_count(self, n: int) -> int:
        """A per-rank count (tokens of a step) summed over the DP ranks."""
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return int(t)

    def agree(self, seconds: float) -> float:
        """The slowest rank's figure: every rank's clock then reads the same."""
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def agree_stop(self, signum: int | None) -> int | None:
        """A stop any rank was asked for (Ctrl-C reaches ranks at different moments): every
        rank then stops at the same step, or one would wait in a collective forever."""
        t = torch.tensor([signum or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t) or None

    def barrier(self) -> None:
        dist.barrier()
