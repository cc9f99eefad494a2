"""Pipeline parallelism with torch.distributed.pipelining and a 1F1B schedule.

The layers are cut into pp contiguous stages: the first holds the embedding, the last the
final norm, the head and the MTP modules. Every rank builds the whole model (same seed)
and trains only its stage's parameters (the others never get a gradient, so AdamW leaves
them alone). The step's micro-batches (grad_accum of them, at least pp) go through
`Schedule1F1B`: one forward, one backward, alternating once the pipeline is full.

Two things cross stages that a plain stack of layers would not carry:
  * the MoE balance losses of the earlier stages: `AttachAux` adds them to the loss through
    the backward (identity forward; its backward gives the aux loss a gradient of 1 as soon
    as the stage's output receives its gradient, Megatron's MoEAuxLossAutoScaler);
  * the MTP module needs the token embedding on the last stage: it uses the model's own
    embedding there, and the first and last stages add their embedding gradients after
    the backward (as Megatron does for tied embeddings).
The last stage computes the loss exactly as CausalLM.loss does (per-target sums over the
step's global counts, balance losses over micro-batches).

With dp > 1 every DP rank runs its own pipeline over its rows (the pp group is the ranks
of one DP index), and the stages' gradients are summed over DP afterwards. The dense
weights are then replicated over DP rather than FSDP-sharded: a stage calls its blocks,
embedding and head itself, outside the model's forward, where FSDP's gathers would not
happen. EP and TP work inside a stage unchanged (an EP or TP group never spans stages).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B


class AttachAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, aux):
        ctx.aux_shape = aux.shape
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=grad.dtype, device=grad.device)


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    per, extra = divmod(n_layers, pp)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


def stage_owns(name: str, model, pp: int, stage: int) -> bool:
    """Whether parameter or buffer `name` is trained (and checkpointed) on `stage`."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) in stage_layers(model.config.num_hidden_layers, pp, stage)
    if name.startswith("model.embed_tokens."):  # the MTP module's lookups use it too
        return stage == 0 or (stage == pp - 1 and len(model.mtp) > 0)
    return stage == pp - 1  # final norm, head, MTP


class Stage(nn.Module):
    """Layers [first, last) of the trunk; the embedding on the first stage, the final norm
    on the last. forward: input_ids (first) or hidden states -> hidden states."""

    def __init__(self, model, layers: range, first: bool, last: bool, pipe):
        super().__init__()
        self.model_ref = [model]  # not a submodule: only the stage's modules are registered
        self.first, self.last, self.pipe = first, last, pipe
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.embed = model.model.embed_tokens if first else None
        self.norm = model.model.norm if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model_ref[0]
        S = x.shape[1]
        freqs_cis = model.rotary(torch.arange(S, device=x.device).expand(x.shape[0], S))
        h = self.embed(x) if self.first else x
        for layer in self.layers:
            h = layer(h, freqs_cis)
        if self.last:
            return self.norm(h)
        aux = [l.mlp.aux_loss for l in self.layers if getattr(l.mlp, "aux_loss", None) is not None]
        if aux and model.training:
            share = torch.stack(aux).sum() / self.pipe.num_batches
            self.pipe.record("aux_loss", share)
            h = AttachAux.apply(h, share)
        return h


class Pipeline:
    """Runs a training step's micro-batches through this rank's stage."""

    def __init__(self, model, group, device: torch.device, micro_batch: torch.Tensor,
                 n_microbatches: int):
        self.model, self.group = model, group
        self.pp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_microbatches < self.pp:
            raise ValueError(f"pipeline parallel needs grad_accum >= pp micro-batches per step, "
                             f"got grad_accum={n_microbatches} with pp={self.pp}")
        if model.config.num_hidden_layers < self.pp:
            raise ValueError(f"pp={self.pp} is more stages than the {model.config.num_hidden_layers} layers")
        first, last = self.rank == 0, self.rank == self.pp - 1
        self.stage_module = Stage(model, stage_layers(model.config.num_hidden_layers, self.pp, self.rank),
                                  first, last, self)
        # the shapes crossing stages, given rather than inferred (no metadata round trip)
        b, S = micro_batch.shape
        hidden = torch.empty(b, S, model.config.hidden_size, device=device,
                             dtype=next(model.parameters()).dtype, requires_grad=True)
        stage = PipelineStage(self.stage_module, self.rank, self.pp, device, group=group,
                              input_args=micro_batch.to(device) if first else hidden,
                              output_args=hidden)
        # every stage gets the loss (only the last calls it): a schedule without one runs no
        # backward; scale_grads off: each micro-batch's loss is already its share of the step
        self.schedule = Schedule1F1B(stage, n_microbatches, loss_fn=self._loss, scale_grads=False)
        self.first, self.last = first, last
        self.targets, self.num_batches, self.sums = None, 1, {}

    def record(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self.sums[key] = v if key not in self.sums else self.sums[key] + v

    def _loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CausalLM.loss's rule on the last stage; target [b, 2, S] = (input_ids, labels)."""
        model, count = self.model, self.targets.count
        input_ids, labels = target[:, 0], target[:, 1]
        S = input_ids.shape[1]
        positions = torch.arange(S, device=h.device).expand(input_ids.shape[0], S)
        lm = model._ce_sum(model.lm_head(h), labels) / count[0].clamp(min=1)
        self.record("lm_loss", lm)
        loss, mtp = lm, []
        for k in range(1, len(model.mtp) + 1):
            if S - k <= 0:
                break
            h, logits = model.mtp_forward(k - 1, h[:, :S - k], input_ids[:, k:], positions[:, :S - k])
            mtp.append(model._ce_sum(logits, labels[:, k:]) / count[k].clamp(min=1))
        if mtp:
            self.record("mtp_loss", torch.stack(mtp).mean())
            loss = loss + model.config.mtp_loss_weight * torch.stack(mtp).mean()
        aux = [m.aux_loss for m in self._last_moe() if m.aux_loss is not None]
        self.record("main_loss", loss)  # + every stage's balance losses = the logged loss
        if aux:
            share = torch.stack(aux).sum() / self.num_batches
            self.record("aux_loss", share)
            loss = loss + share
        return loss

    def _last_moe(self):
        mods = [l.mlp for l in self.stage_module.layers] + [m.mlp for m in self.model.mtp]
        return [m for m in mods if hasattr(m, "update_bias")]

    def step(self, batches: list, targets) -> dict:
        """Forward and backward of the step's micro-batches; returns the logged sums (the
        loss parts from the last stage, the balance losses from every stage), on every rank."""
        self.targets, self.num_batches, self.sums = targets, targets.micro_batches, {}
        x = torch.cat([b[0] for b in batches])
        target = torch.cat([torch.stack([b[0], b[1]], dim=1) for b in batches])
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=target)
        else:
            self.schedule.step()
        self._sum_embedding_grads()
        keys = ["main_loss", "lm_loss", "mtp_loss", "aux_loss"]
        vals = torch.stack([self.sums.get(k, torch.zeros(())) for k in keys])
        dist.all_reduce(vals, group=self.group)  # the CE parts from the last stage, aux from all
        out = dict(zip(keys, vals))
        out["loss"] = out.pop("main_loss") + out["aux_loss"]
        if len(self.model.mtp) == 0:
            out["mtp_loss"] = None
        return out

    def _sum_embedding_grads(self) -> None:
        """First and last stage both used the embedding (lookups, MTP): add their grads."""
        if not len(self.model.mtp) or self.pp == 1:
            return
        w = self.model.model.embed_tokens.weight
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        if not (self.first or self.last):
            g = torch.zeros_like(w)
        dist.all_reduce(g, group=self.group)
        if self.first or self.last:
            w.grad = g
