"""The training state sharded with torch.distributed.checkpoint (DCP), and its consolidation
into a model (`consolidated_model`).

Every rank writes its own shards (FSDP's dense shards, TP's, its own routed experts) into
`RUN/checkpoint/`; the keys are the model's fully qualified names and the optimizer state is
keyed by them too (DCP's `get_state_dict`), never by position, so a checkpoint saved on N
processes loads on M: DCP reads for each rank the pieces its layout needs (on one process,
everything). The loop's own state (step, tokens, time, scaler, RNG, settings) is small and
rank 0 writes it beside the shards as `trainer.pt`.

Saving is kill-safe the way train_state.pt is: the new checkpoint is written to a staging
directory and only a complete one is renamed into place. After each save rank 0
consolidates it into the run directory as a plain HF checkpoint (`save_pretrained` of a
single-process model loaded from the shards), so the run directory loads with transformers
whatever the number of processes that trained it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

CHECKPOINT_DIR = "checkpoint"
TRAINER_FILE = "trainer.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def exists(out_dir: str | Path) -> bool:
    return (Path(out_dir) / CHECKPOINT_DIR / ".metadata").exists()


def _states(trainer) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, the part of both this rank writes and reads). Under
    pipeline parallel a rank holds the whole model but trains only its stage: the rest is
    stale there and stays out of the checkpoint."""
    msd, osd = get_state_dict(trainer.model, trainer.optimizer, options=StateDictOptions(strict=True))
    owns = trainer.parallel.owns  # a Parallel, or a SingleProcess that owns everything
    mine = {"model": {k: v for k, v in msd.items() if owns(k)},
            "optimizer": {k: v for k, v in osd["state"].items() if owns(k)}}
    return msd, osd, mine


def save(trainer) -> Path:
    """Every rank: write the shards; rank 0: the loop state, the swap, the HF consolidation."""
    out_dir = Path(trainer.out_dir)
    final, staging = out_dir / CHECKPOINT_DIR, out_dir / f".{CHECKPOINT_DIR}.step{trainer.step}"
    if _is_main() and staging.exists():
        shutil.rmtree(staging)
    _barrier()
    _, _, mine = _states(trainer)
    dcp.save(mine, checkpoint_id=staging, no_dist=not _distributed())
    _barrier()
    if _is_main():
        torch.save(trainer.loop_state(), staging / TRAINER_FILE)
        old = out_dir / f".{CHECKPOINT_DIR}.old"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if trainer.on_checkpoint is not None:
            trainer.on_checkpoint(consolidated_model(final, trainer.model.config), trainer.step)
    _barrier()
    return final


def resume(trainer) -> bool:
    """Load RUN/checkpoint into this rank's layout (any number of processes)."""
    ckpt = Path(trainer.out_dir) / CHECKPOINT_DIR
    for stale in Path(trainer.out_dir).glob(f".{CHECKPOINT_DIR}.*"):
        if _is_main():
            shutil.rmtree(stale, ignore_errors=True)
    if not exists(trainer.out_dir):
        return False
    msd, osd, mine = _states(trainer)
    dcp.load(mine, checkpoint_id=ckpt, no_dist=not _distributed())  # in place, into msd/osd
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=msd, optim_state_dict=osd)
    trainer.load_loop_state(torch.load(ckpt / TRAINER_FILE, weights_only=False))
    return True


def consolidated_model(ckpt: str | Path, config):
    """A single-process CausalLM with every tensor of the sharded checkpoint `ckpt`."""
    from nanoseek.model import CausalLM

    model = CausalLM(config)
    sd = model.state_dict()
    dcp.load({"model": sd}, checkpoint_id=Path(ckpt), no_dist=True)
    model.load_state_dict(sd)
    return model
