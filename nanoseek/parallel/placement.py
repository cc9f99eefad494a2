"""Where the routed experts live, and what routing to them costs.

Experts are laid on the ranks of an EP group in contiguous blocks: rank r owns experts
[r*E/ep, (r+1)*E/ep). V3 groups its experts the same way (n_group contiguous groups) and
routes each token to at most `topk_group` groups; with n_group a multiple of ep every group
sits whole on one rank, so a token's slots visit at most min(topk_group, top_k, ep) ranks:
DeepSeek-V3's node-limited routing (one group per node, at most 4 nodes per token), here
with ranks for nodes.

`PlacementStats` measures it on every training forward: slots sent to other ranks, the
bytes that moves (dispatch and combine), distinct ranks visited per token against the
bound, and the slots each rank receives (its load).
"""

from __future__ import annotations

import torch


def expert_owner(expert: int, n_experts: int, ep: int) -> int:
    return expert // (n_experts // ep)


def routing_bound(n_experts: int, top_k: int, n_group: int, topk_group: int, ep: int) -> int:
    """The most ranks one token's slots can visit under this placement."""
    bound = min(top_k, ep)
    if n_group > 1 and n_group % ep == 0:  # whole groups per rank: group-limited routing binds
        bound = min(bound, topk_group)
    return bound


class PlacementStats:
    """Sums over the forwards of one optimizer step; `read()` returns them and starts over."""

    def __init__(self, n_experts: int, ep: int, bound: int):
        self.n_experts, self.ep, self.bound = n_experts, ep, bound
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.remote_slots = 0
        self.bytes = 0
        self.ranks_visited = 0
        self.max_ranks = 0
        self.load = [0] * self.ep

    @torch.no_grad()
    def add(self, indices: torch.Tensor, send: list[int], recv: list[int], rank: int,
            x: torch.Tensor) -> None:
        owners = indices // (self.n_experts // self.ep)  # [N, k] rank of each slot
        visits = torch.zeros(indices.shape[0], self.ep, dtype=torch.bool, device=indices.device)
        visits.scatter_(1, owners, True)
        per_token = visits.sum(1)
        remote = sum(send) - send[rank]
        self.tokens += indices.shape[0]
        self.remote_slots += remote
        self.bytes += 2 * remote * x.shape[-1] * x.element_size()  # out and back
        self.ranks_visited += int(per_token.sum())
        self.max_ranks = max(self.max_ranks, int(per_token.max()) if per_token.numel() else 0)
        self.load[rank] += sum(recv)

    def totals(self) -> tuple[torch.Tensor, int]:
        """This rank's sums for the step [tokens, remote slots, bytes, ranks visited,
        load per rank...] (to be summed over ranks) and its most ranks for one token;
        starts the next step."""
        sums = torch.tensor([self.tokens, self.remote_slots, self.bytes, self.ranks_visited,
                             *self.load], dtype=torch.float64)
        most = self.max_ranks
        self.reset()
        return sums, most

    def summarize(self, sums: torch.Tensor, most: int) -> dict:
        """The step's figures from the sums of every rank: what the metrics log."""
        tokens, remote, nbytes, visited = sums[:4].tolist()
        return {"a2a_remote_slots": int(remote), "a2a_bytes": int(nbytes),
                "ranks_per_token": visited / max(tokens, 1), "ranks_per_token_max": most,
                "ranks_bound": self.bound, "load_per_rank": [int(v) for v in sums[4:].tolist()]}
