"""On-policy distillation's per-token objective (DeepSeek-V4): the reverse KL from the
student to a teacher over the full vocabulary, KL(π_θ(·|s_t) || π_E(·|s_t)), at every
token s_t of the student's own samples.

What the V4 report says: post-training replaces V3.2's mixed RL by multi-teacher
on-policy distillation; domain experts (each fine-tuned, then trained with GRPO) are the
teachers; the student generates its own trajectories and minimises
    L_OPD(θ) = Σ_i w_i · D_KL(π_θ || π_{E_i})
per token, as *full-vocabulary* logit distillation (the exact KL over every id, not the
sampled-token estimate log π_θ(y) − log π_E(y), which has the same expectation and far more
variance). What it leaves open, and what is chosen here: how the w_i are set (each
prompt's own domain teacher gets its weight, the others 0: the per-token weight is the
prompt's teacher's `weight`, default 1); the temperature (the sampling temperature,
default 1, divides student and teacher logits alike); the normalisation over tokens
(GRPO's `loss_type`, default each completion's token mean: objectives.normalise); no
gradient through the sampling (the trajectory is fixed data once sampled, as in
GKD/Thinking Machines' on-policy distillation).

Memory: the student's and the teacher's [tokens, vocab] fp32 logits of a whole batch are
never held. `head_reverse_kl` keeps the hidden states (h, h_E) and the two head weights,
and forms both logits `rows` rows at a time, in the forward and again in the backward,
where the gradient with respect to the student's logits has the closed form
    ∂KL/∂z_j = p_j (log p_j − log q_j − KL) / T
(p = softmax(z/T), q the teacher's), so nothing of vocabulary width lives beyond one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 bytes of one [rows, vocab] logits chunk (both models' chunks exist at once)
KL_CHUNK_BYTES = 16 * 2**20


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(z_s/T) || softmax(z_t/T)) per row [...] of logits [..., V]: the plain
    expression (every row at once, autograd's own backward), in the logits' precision
    raised to at least fp32."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def head_reverse_kl(student_head, h: torch.Tensor, teacher_head, h_teacher: torch.Tensor,
                    temperature: float = 1.0, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-token KL(π_student || π_teacher) [N] from hidden states h [N, D] (the student's,
    with grad) and h_teacher [N, D_E] (no grad) through each model's output head, chunked
    as the module docstring says. A head that is not a plain bias-free nn.Linear (an
    adapter, a quantised or sharded head) goes through `reverse_kl` over all rows."""
    vocab = student_head.out_features
    if getattr(teacher_head, "out_features", vocab) != vocab:
        raise ValueError(f"student and teacher heads differ in vocabulary ({vocab} vs "
                         f"{teacher_head.out_features} ids): OPD compares distributions id by id")
    rows = chunk_rows or max(1, KL_CHUNK_BYTES // (4 * vocab))
    if not (_plain(student_head) and _plain(teacher_head)):
        with torch.no_grad():
            teacher_logits = teacher_head(h_teacher)
        return reverse_kl(student_head(h), teacher_logits, temperature)
    return HeadReverseKL.apply(h, student_head.weight, h_teacher.detach(),
                               teacher_head.weight.detach(), temperature, rows)


def _plain(head) -> bool:
    w = getattr(head, "weight", None)
    return type(head) is torch.nn.Linear and head.bias is None and type(w.data) is torch.Tensor


def _chunk_terms(h, w, ht, wt, temperature):
    """(log p, log q) of one chunk, fp32."""
    log_p = F.log_softmax(F.linear(h.float(), w.float()) / temperature, dim=-1)
    log_q = F.log_softmax(F.linear(ht.float(), wt.float()) / temperature, dim=-1)
    return log_p, log_q


class HeadReverseKL(torch.autograd.Function):
    """KL(softmax(hWᵀ/T) || softmax(h_E W_Eᵀ/T)) per row, keeping h, W, h_E, W_E only."""

    @staticmethod
    def forward(ctx, h, weight, h_teacher, w_teacher, temperature, rows):
        ctx.save_for_backward(h, weight, h_teacher, w_teacher)
        ctx.temperature, ctx.rows = temperature, rows
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        with torch.no_grad():
            for lo in range(0, h.shape[0], rows):
                log_p, log_q = _chunk_terms(h[lo:lo + rows], weight, h_teacher[lo:lo + rows],
                                            w_teacher, temperature)
                out[lo:lo + rows] = (log_p.exp() * (log_p - log_q)).sum(-1)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, h_teacher, w_teacher = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for lo in range(0, h.shape[0], rows):
            hc = h[lo:lo + rows]
            log_p, log_q = _chunk_terms(hc, weight, h_teacher[lo:lo + rows], w_teacher, T)
            p = log_p.exp()
            diff = log_p - log_q
            kl = (p * diff).sum(-1, keepdim=True)
            gz = p * (diff - kl) * (grad[lo:lo + rows].float().unsqueeze(-1) / T)  # d/d logits
            if need_h:
                grad_h[lo:lo + rows] = gz @ weight.float()
            if need_w:
                grad_w.addmm_(gz.t(), hc.float())
        return (grad_h.to(h.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None)
