"""The parallel flags every training command that runs under torchrun shares (pretrain,
sft, grpo): `--nproc N` relaunches the command under torchrun, `--ep/--tp/--pp` lay the
model out over those processes. The same spelling and help everywhere; a layout a stage
cannot run (SFT pipeline-parallel, RL anything but data-parallel) is refused by the stage
with one line saying why."""

from __future__ import annotations

import typer


def nproc_option(how_batches_split: str):
    return typer.Option(1, "--nproc", min=1, help="processes on this machine: >1 relaunches the command "
                        f"under torchrun ({how_batches_split})")


def ep_option():
    return typer.Option(1, "--ep", min=1, help="expert-parallel size: each rank keeps n_routed_experts/ep "
                        "experts (divides the data-parallel size; with --nproc)")


def tp_option():
    return typer.Option(1, "--tp", min=1, help="tensor-parallel size: MLA heads and the dense FFN split over "
                        "tp ranks (with --nproc)")


def pp_option():
    return typer.Option(1, "--pp", min=1, help="pipeline stages (1F1B; needs grad-accum >= pp; with --nproc); "
                        "processes = pp x dp x tp, and DP replicates the weights under PP")


def launch(command: str, nproc: int, ep: int = 1, tp: int = 1, pp: int = 1) -> None:
    """Relaunch under torchrun for --nproc > 1 (exits with its code); refuse --ep/--tp/--pp
    on one process."""
    from nanoseek.parallel import launch as torchrun
    if nproc > 1 and not torchrun.under_torchrun():
        raise typer.Exit(torchrun.relaunch(nproc, command))
    if (ep, tp, pp) != (1, 1, 1) and not torchrun.under_torchrun():
        raise typer.BadParameter("--ep/--tp/--pp split the model over processes: give --nproc N "
                                 "(or launch with torchrun)", param_hint="--ep/--tp/--pp")
