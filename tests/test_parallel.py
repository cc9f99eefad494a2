"""Distributed training on 2 gloo processes equals the single-process run.

Tolerance: fp32, max |Δgrad| <= 1e-5 (measured ~2e-8: only the order of a few sums
differs), losses to 1e-5 relative over three optimizer steps (clipping and the router-bias
update included)."""

import pytest
import torch

from nanoseek.parallel.launch import args_without_nproc
from nanoseek.parallel.mesh import ParallelConfig
from nanoseek.parallel.placement import routing_bound
from tests.parallel_utils import errors, run_ranks, train_case

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


def _layouts(rank):
    """One spawn, three runs (spawning costs more than training the micro model)."""
    return {"dp": train_case(rank, {"ep": 1}, steps=STEPS), "ep": train_case(rank, {"ep": 2}, steps=STEPS),
            "tp": train_case(rank, {"tp": 2}, steps=STEPS)}


@pytest.fixture(scope="module")
def reference():
    return train_case(0, None, steps=STEPS)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_layouts, 2, tmp_path_factory.mktemp("ranks"), timeout=240)


def _assert_same_run(ref, ranks):
    grads = {}
    for r in ranks:  # dense gradients are whole on every rank; experts on their owner
        grads.update(r["grads"])
    assert set(grads) == set(ref["grads"])
    delta = max(float((grads[n] - ref["grads"][n]).abs().max()) for n in grads)
    print(f"max |Δgrad| = {delta:.2e}")
    assert delta <= 1e-5
    for step in range(STEPS):
        for k in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            for r in ranks:
                assert r["metrics"][step][k] == pytest.approx(ref["metrics"][step][k], rel=1e-5), (step, k)
        assert ranks[0]["metrics"][step]["step_tokens"] == ref["metrics"][step]["step_tokens"]
        assert ranks[0]["metrics"][step]["max_violation"] == pytest.approx(ref["metrics"][step]["max_violation"])
    for r in ranks:  # the bias update saw the global load: biases equal the 1-process ones
        for a, b in zip(r["biases"], ref["biases"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_data_parallel_equals_one_process(reference, two_ranks):
    _assert_same_run(reference, [r["dp"] for r in two_ranks])


def test_expert_parallel_equals_one_process(reference, two_ranks):
    ranks = [r["ep"] for r in two_ranks]
    _assert_same_run(reference, ranks)
    own = [{n.split(".experts.")[1].split(".")[0] for n in r["grads"] if ".experts." in n} for r in ranks]
    assert own[0] == {"0", "1", "2", "3"} and own[1] == {"4", "5", "6", "7"}  # E/ep each
    m = ranks[0]["metrics"][0]
    assert 1 <= m["ranks_per_token"] <= m["ranks_per_token_max"] <= m["ranks_bound"] == 2
    # top-2 slots of every token of the main MoE layer (64) and of the MTP one (4 rows x 15)
    assert sum(m["load_per_rank"]) == 2 * (m["step_tokens"] + 4 * 15)
    assert m["a2a_remote_slots"] > 0 and m["a2a_bytes"] == m["a2a_remote_slots"] * 2 * 48 * 4


def test_tensor_parallel_equals_one_process(reference, two_ranks):
    """MLA split by heads (q_b/kv_b column-wise, o_proj row-wise, k_pe's gradient summed over
    the TP ranks), the dense FFN column/row-wise."""
    _assert_same_run(reference, [r["tp"] for r in two_ranks])


@pytest.mark.slow  # 4 processes on this 2-core machine
def test_dp_tp_ep_mesh_on_four_processes_equals_one_process(reference, tmp_path):
    """dp=2 x tp=2 with ep=2: FSDP over dp (2-D with the TP shards), EP over dp, TP."""
    _assert_same_run(reference, run_ranks(train_case, 4, tmp_path, {"tp": 2, "ep": 2}, STEPS, timeout=400))


def _die_after_one_step(rank):
    import os
    from nanoseek.parallel.launch import clear_peer_errors
    from nanoseek.model import CausalLM
    from nanoseek.parallel.runtime import Parallel
    from tests.train_utils import micro_config
    model = CausalLM(micro_config())
    Parallel(model, ParallelConfig(ep=2), torch.device("cpu"))
    x = torch.randint(3, 300, (2, 16))
    model.loss(x, x).loss.backward()
    if rank == 1:
        os._exit(3)  # a rank that dies mid-run
    with clear_peer_errors():
        for _ in range(3):
            model.loss(x, x).loss.backward()
    return "finished"


@pytest.mark.slow  # ~20 s: spawn, then the survivor waits for gloo to notice
def test_a_dead_rank_makes_the_other_fail_clearly(tmp_path):
    results = run_ranks(_die_after_one_step, 2, tmp_path, timeout=120, check=False)
    assert results == [None, None]
    err = errors(tmp_path)[0]
    assert err.startswith("PeerFailure: rank 0: a collective failed or timed out")


def test_routing_bound_and_layout_checks():
    # V3: 256 experts, 8 groups keep 4, top-8 on 8 ranks (groups whole on a rank): 4 ranks
    assert routing_bound(256, 8, 8, 4, ep=8) == 4
    assert routing_bound(256, 8, 8, 4, ep=64) == 8  # groups split over ranks: only top_k binds
    assert routing_bound(8, 2, 4, 2, ep=2) == 2
    with pytest.raises(ValueError, match="ep=3 must divide the data-parallel size dp=2"):
        ParallelConfig(ep=3).validate(2, 8)
    with pytest.raises(ValueError, match="n_routed_experts=6"):
        ParallelConfig(ep=4).validate(4, 6)


def test_nproc_is_dropped_from_the_relaunched_command():
    argv = ["nanoseek", "pretrain", "--out", "r", "--nproc", "2", "--ep", "2", "--nproc=3"]
    assert args_without_nproc(argv) == ["--out", "r", "--ep", "2"]
