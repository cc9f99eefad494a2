"""Training on G completions of one prompt without running the prompt G times.

GRPO trains on groups: G completions that share a prompt. Right-padded into G rows
(rollout.pack) the prompt's tokens go through the trunk G times, forward and backward,
for the policy and again for the reference model; at the arithmetic task's 40-token
prompts and ~37-token completions that is half the tokens of a step. Packed here, a row
holds the prompt once and then each completion, and an attention mask keeps the
completions apart (the shared-prefix layout of RL trainers that pack groups):

    row:       p0 p1 ... pP-1 | a0 a1 ... | b0 b1 ... | pad
    positions: 0  1  ... P-1  | P  P+1 ...| P  P+1 ...| 0
    a_j attends to p_0..p_P-1 and a_0..a_j; b_j to the prompt and b_0..b_j; never a to b.

Each completion token therefore sees exactly the context it had in its own padded row, at
the same RoPE positions: the log-probs are the padded layout's, to float rounding
(tests/test_shared_prefix.py). The last prompt token's hidden state predicts the first
token of every completion: log-probs are read by gathering, per completion token, the
position that predicts it, so the language-model head also runs only where a completion
token is predicted, not over prompts and padding.

The mask reaches attention through the model's cache protocol (model/cache.py): a
`SharedPrefixMask` stores nothing and hands every layer the row mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.model.cache import PaddedRows
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.train.rl.rollout import target_logprobs

# A packed row holds at most this many tokens (or one prompt and its longest completion,
# if longer): attention runs dense over a row, so very long rows would cost more than
# the prompt tokens they save.
MAX_ROW_TOKENS = 1024


class SharedPrefixMask(PaddedRows):
    """The Cache protocol with no storage: every layer attends under the packed rows' mask,
    and the MoE counts only the real tokens (`token_mask`) toward its load."""

    def __init__(self, mask: torch.Tensor, token_mask: torch.Tensor):
        super().__init__(token_mask)  # [R, S] bool, True = a prompt or completion token
        self.mask = mask  # [R, S, S] bool, True = may attend

    def update(self, layer_id: int, *new: torch.Tensor):
        return new, self.mask


@dataclass
class SharedPrefixBatch:
    """R packed rows for N completions; per-completion tensors are [N, T], T the longest
    completion, column j = completion token j."""
    inputs: torch.Tensor      # [R, S] token ids (pad_id after a row's end)
    positions: torch.Tensor   # [R, S] RoPE positions (a completion restarts after the prompt)
    attn_mask: torch.Tensor   # [R, S, S] bool
    real: torch.Tensor        # [R, S] bool: a prompt or completion token (not padding)
    rows: torch.Tensor        # [N, T] row of the position that predicts completion token j
    cols: torch.Tensor        # [N, T] and its column in that row
    targets: torch.Tensor     # [N, T] completion token j (IGNORE_INDEX past the completion)
    mask: torch.Tensor        # [N, T] bool: a completion token

    def to(self, device) -> "SharedPrefixBatch":
        return SharedPrefixBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def plan_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]],
              max_row_tokens: int = MAX_ROW_TOKENS) -> list[list[int]]:
    """Completion indices per packed row: completions of the same prompt (equal token ids),
    in order, while the row fits max_row_tokens (a prompt and one completion always do)."""
    rows: list[list[int]] = []
    open_row: dict[tuple, tuple[int, int]] = {}  # prompt -> (row index, tokens in it)
    for n, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        key, need = tuple(p), max(len(c) - 1, 0)
        r = open_row.get(key)
        if r is not None and r[1] + need <= max_row_tokens:
            rows[r[0]].append(n)
            open_row[key] = (r[0], r[1] + need)
        else:
            rows.append([n])
            open_row[key] = (len(rows) - 1, len(p) + need)
    return rows


def pack_shared_prefix(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                       device=None, max_row_tokens: int = MAX_ROW_TOKENS) -> SharedPrefixBatch:
    """Lay out completions (each with its prompt) as packed rows; see the module docstring."""
    if any(not p for p in prompt_ids):
        raise ValueError("every completion needs a prompt of at least one token")
    plan = plan_rows(prompt_ids, completion_ids, max_row_tokens)
    lengths = [len(prompt_ids[r[0]]) + sum(max(len(completion_ids[n]) - 1, 0) for n in r) for r in plan]
    R, S = len(plan), max(lengths)
    N, T = len(completion_ids), max(1, max(len(c) for c in completion_ids))
    inputs = torch.full((R, S), pad_id, dtype=torch.long)
    positions = torch.zeros(R, S, dtype=torch.long)
    attn = torch.eye(S, dtype=torch.bool).repeat(R, 1, 1)  # padding attends to itself only
    real = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    rows = torch.zeros(N, T, dtype=torch.long)
    cols = torch.zeros(N, T, dtype=torch.long)
    targets = torch.full((N, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for r, members in enumerate(plan):
        p = prompt_ids[members[0]]
        P = len(p)
        inputs[r, :P] = torch.tensor(p)
        positions[r, :P] = torch.arange(P)
        attn[r, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        start = P
        for n in members:
            c = completion_ids[n]
            k = max(len(c) - 1, 0)  # the last completion token is only ever a target
            seg = slice(start, start + k)
            inputs[r, seg] = torch.tensor(c[:k], dtype=torch.long)
            positions[r, seg] = torch.arange(P, P + k)
            attn[r, seg, :P] = True
            attn[r, seg, seg] = torch.ones(k, k, dtype=torch.bool).tril()
            L = len(c)
            rows[n, :L] = r
            cols[n, :L] = torch.tensor([P - 1] + list(range(start, start + k)), dtype=torch.long)[:L]
            targets[n, :L] = torch.tensor(c, dtype=torch.long)
            mask[n, :L] = True
            start += k
    return SharedPrefixBatch(inputs, positions, attn, real, rows, cols, targets, mask).to(device)


def shared_prefix_logprobs(model, batch: SharedPrefixBatch, temperature: float = 1.0) -> torch.Tensor:
    """log π(completion token j | prompt, completion[:j]) as [N, T] (0 past a completion),
    the same numbers rollout.token_logprobs gives over the padded layout."""
    h = model.hidden(batch.inputs, batch.positions, SharedPrefixMask(batch.attn_mask, batch.real))
    where = batch.mask.flatten().nonzero().flatten()  # completion tokens only: no padding
    logp = target_logprobs(model, h[batch.rows.flatten()[where], batch.cols.flatten()[where]],
                           batch.targets.flatten()[where], temperature)
    return logp.new_zeros(batch.mask.numel()).index_copy(0, where, logp).view(batch.mask.shape)
