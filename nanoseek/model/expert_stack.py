"""The routed experts' weights stacked, so that each projection of every expert is one
grouped GEMM instead of a Python loop over the experts.

`MoE.dispatch` sorts its token-slots by expert; the loop then calls each expert's SwiGLU:
three linears, two element-wise ops and four module calls per expert. On a CPU at decode's
few tokens per expert that is per-call cost more than arithmetic. `torch._grouped_mm` (the
kernel transformers' "grouped_mm" experts use) takes the sorted rows, the stacked weights and
the offsets where each expert's rows end, and runs every expert's product in one call (one
MoE layer's dispatch of 8 experts at 16 tokens in the engine: 1.0-1.2 ms as the loop,
0.8-0.9 ms grouped; 2-core Xeon, fp32, one thread; benchmarks/bench_expert_stack.py):

    h = [x_e W_gate,e^T | x_e W_up,e^T]_e    one grouped GEMM over W_13 [E, D, 2I]
    y = (SiLU(h_gate) * h_up)_e W_down,e^T   one grouped GEMM over W_2  [E, I, D]

Nothing is padded: each expert multiplies its own rows, so the values are the loop's.

The stack is the weights' storage, not a copy: each expert's `gate_proj`, `up_proj` and
`down_proj` weight becomes a view into W_13 / W_2 (same [out, in] shape and values; the
strides put the reduced dimension first, the k-major layout of engine/weight_layout.py), so
the model's state dict, an optimiser stepping the weights in place and a save see the same
parameters as before, and no memory is added. Before each use `WeightViews.current` checks
that the experts still are those modules with those parameters on that storage, with no
forward hook the loop would have run: a module replaced (a LoRA wrapper), a parameter
reassigned, a move to another device or dtype, or a hook turns the grouped path off and the
loop runs.

Used for inference on a CPU (no autograd: the CPU grouped kernel has no backward here), set
up by the engine (`stack_experts`); training and GPUs keep the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from nanoseek.model.mlp import MLP


class ExpertStack:
    def __init__(self, moe: nn.Module):
        """Copy the experts' weights into W_13 [E, D, 2I] and W_2 [E, I, D] and make each
        weight a view of its block."""
        experts = moe.experts
        w = experts[0].gate_proj.weight
        inter, dim = w.shape
        self.w13 = torch.empty(len(experts), dim, 2 * inter, dtype=w.dtype, device=w.device)
        self.w2 = torch.empty(len(experts), inter, dim, dtype=w.dtype, device=w.device)
        self.inter, self.swiglu_limit = inter, experts[0].swiglu_limit
        for e, expert in enumerate(experts):
            views = (self.w13[e, :, :inter].t(), self.w13[e, :, inter:].t(), self.w2[e].t())
            for name, view in zip(NAMES, views):
                view.copy_(expert._modules[name].weight)
                expert._modules[name].weight.data = view
        self.views = WeightViews([(moe, "experts")] + [(experts, str(e)) for e in range(len(experts))]
                                 + [(expert, name) for expert in experts for name in NAMES])

    def __reduce__(self):
        """Copied (copy.deepcopy) or pickled (torch.save of the model), the stack becomes None:
        the copy's experts get storage of their own, and a stack beside them would only hold a
        second copy of their weights."""
        return type(None), ()

    def usable(self) -> bool:
        """No autograd, and the experts still read their weights from this stack."""
        return not torch.is_grad_enabled() and self.views.current()

    def __call__(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D], rows sorted by expert, counts [E] rows per expert -> every row through
        its expert's SwiGLU [M, D]."""
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x, self.w13, offs=offs)
        gate, up = h[:, :self.inter], h[:, self.inter:]
        if self.swiglu_limit > 0:  # V4's clamp, as MLP.forward
            gate, up = gate.clamp(max=self.swiglu_limit), up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return torch._grouped_mm(F.silu(gate) * up, self.w2, offs=offs)


NAMES = ("gate_proj", "up_proj", "down_proj")


class WeightViews:
    """The modules at `slots` [(parent, name)] as they were when their linears' weights were
    made views of the stack, and the check that they still are."""

    def __init__(self, slots: list[tuple[nn.Module, str]]):
        self.slots = slots
        self.modules = [parent._modules[name] for parent, name in slots]
        weights = [m._parameters["weight"] for m in self.modules if type(m) is nn.Linear]
        self.weight_ids = [id(w) for w in weights]
        self.ptrs = [w.data_ptr() for w in weights]

    def current(self) -> bool:
        """The same modules at the same places, holding the same parameters, whose data is still
        the shared tensor's, and no forward hook that calling them one by one would run (a few
        list comparisons: this runs before every grouped call)."""
        modules = [parent._modules.get(name) for parent, name in self.slots]
        if modules != self.modules or _global_hooks():
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
            return False
        weights = [m._parameters.get("weight") for m in modules if type(m) is nn.Linear]
        return [id(w) for w in weights] == self.weight_ids and [w.data_ptr() for w in weights] == self.ptrs


def _global_hooks() -> bool:
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def plain_linear(m: nn.Module) -> bool:
    """A bias-free nn.Linear (not an FP8/FP4/LoRA/NF4 wrapper or subclass) with a plain tensor."""
    return type(m) is nn.Linear and m.bias is None and type(m.weight.data) is torch.Tensor


def _projections(expert: nn.Module) -> list[nn.Module]:
    return [expert._modules.get(name) for name in NAMES]


def stackable(experts: nn.ModuleList) -> bool:
    """Plain SwiGLU experts (MLP of three bias-free `nn.Linear`s, not FP8/FP4/LoRA/NF4
    wrappers) alike: one shape, dtype, device and SwiGLU clamp; fp32 or bf16 on a CPU, with
    rows (hidden and intermediate sizes) a multiple of 16 bytes, as the grouped kernel asks."""
    if not len(experts) or not hasattr(torch, "_grouped_mm"):
        return False
    if not all(type(e) is MLP and all(plain_linear(p) for p in _projections(e)) for e in experts):
        return False
    ref, limit = experts[0].gate_proj.weight, experts[0].swiglu_limit
    for expert in experts:
        g, u, d = (p.weight for p in _projections(expert))
        if (g.shape != ref.shape or u.shape != ref.shape or d.shape != ref.shape[::-1] or expert.swiglu_limit != limit
                or any(w.dtype != ref.dtype or w.device != ref.device for w in (g, u, d))):
            return False
    inter, dim = ref.shape
    aligned = all(n * ref.element_size() % 16 == 0 for n in (inter, dim))  # the kernel's stride rule
    return ref.device.type == "cpu" and ref.dtype in (torch.float32, torch.bfloat16) and aligned


@torch.no_grad()
def stack_experts(model: nn.Module) -> int:
    """Give every MoE layer of `model` (a module with `experts` and an `expert_stack` slot:
    model/moe.py's MoE, which imports this file) whose experts are `stackable` an ExpertStack;
    returns how many layers got one."""
    n = 0
    for m in model.modules():
        if hasattr(m, "expert_stack") and isinstance(getattr(m, "experts", None), nn.ModuleList) and stackable(m.experts):
            m.expert_stack = ExpertStack(m)
            n += 1
    return n
