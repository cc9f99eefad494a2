"""The process group and the device mesh.

torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) starts one
process per device; `init_distributed` joins them with NCCL when CUDA is there and gloo
otherwise, with a timeout so that a rank that dies makes the others fail with an error
instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelConfig:
    """How the processes are laid out. dp is what is left: world / (tp * pp). ep divides dp
    (EP ranks are DP ranks: they hold different tokens). replicate: the dense weights are
    whole on every DP rank and their gradients all-reduced (DDP's way) instead of sharded
    by FSDP2: what GRPO's rollouts need (the engine reads the module's weights directly),
    and what DP does under pipeline parallel (a stage runs its layers outside the model's
    forward, where FSDP's gathers would not happen)."""
    ep: int = 1
    tp: int = 1
    pp: int = 1
    timeout: float = 300.0  # seconds a collective may wait for the other ranks
    replicate: bool = False

    def dp(self, world: int) -> int:
        return world // (self.tp * self.pp)

    def validate(self, world: int, n_experts: int = 0) -> None:
        for name in ("ep", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel option '{name}' must be >= 1, got {getattr(self, name)}")
        if world % (self.tp * self.pp):
            raise ValueError(f"{world} processes cannot be laid out as tp={self.tp} x pp={self.pp} "
                             f"(world size must be a multiple of tp*pp)")
        dp = self.dp(world)
        if dp % self.ep:
            raise ValueError(f"ep={self.ep} must divide the data-parallel size dp={dp} "
                             f"(world {world} / tp {self.tp} / pp {self.pp})")
        if self.ep > 1 and n_experts % self.ep:
            raise ValueError(f"ep={self.ep} must divide n_routed_experts={n_experts}")


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout: float = 300.0) -> torch.device:
    """Join the process group described by torchrun's environment; returns this rank's
    device (cuda:LOCAL_RANK, or cpu)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("not started by torchrun: RANK and WORLD_SIZE are not set "
                           "(use `nanoseek pretrain --nproc N` or `torchrun --nproc_per_node=N "
                           "-m nanoseek.train.pretrain ...`)")
    backend = backend_for_device()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                device_id=device if backend == "nccl" else None)
    return device


@dataclass
class Meshes:
    dense: DeviceMesh  # ("pp", "dp", "tp")
    experts: DeviceMesh  # ("pp", "edp", "ep", "tp"): edp = dp / ep replicas of each expert

    def group(self, name: str) -> dist.ProcessGroup:
        mesh = self.experts if name in ("edp", "ep") else self.dense
        return mesh.get_group(name)

    def size(self, name: str) -> int:
        mesh = self.experts if name in ("edp", "ep") else self.dense
        return mesh.size(mesh.mesh_dim_names.index(name))

    def local_rank(self, name: str) -> int:
        mesh = self.experts if name in ("edp", "ep") else self.dense
        return mesh.get_local_rank(name)


def build_meshes(cfg: ParallelConfig, device: torch.device) -> Meshes:
    """Both views of the same ranks, row-major: rank = ((pp*dp) + dp_rank)*tp + tp_rank and
    dp_rank = edp_rank*ep + ep_rank, so an EP group is ep consecutive DP ranks."""
    world = dist.get_world_size()
    dp = cfg.dp(world)
    dense = init_device_mesh(device.type, (cfg.pp, dp, cfg.tp), mesh_dim_names=("pp", "dp", "tp"))
    experts = init_device_mesh(device.type, (cfg.pp, dp // cfg.ep, cfg.ep, cfg.tp),
                               mesh_dim_names=("pp", "edp", "ep", "tp"))
    return Meshes(dense, experts)
