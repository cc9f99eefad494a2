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
    """One spawn, four runs (spawning costs more than training the micro model). PP runs the
    same 4 rows per step as 2 micro-batches of 2 (1F1B needs micro-batches >= stages)."""
    return {"dp": train_case(rank, {"ep": 1}, steps=STEPS), "ep": train_case(rank, {"ep": 2}, steps=STEPS),
            "tp": train_case(rank, {"tp": 2}, steps=STEPS),
            "pp": train_case(rank, {"pp": 2}, steps=STEPS, B=2, grad_accum=2)}


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


def test_pipeline_parallel_equals_one_process(reference, two_ranks):
    """Two stages (embedding + layer 0 | layer 1, norm, head, MTP), Schedule1F1B over two
    micro-batches; the first stage's balance loss reaches the loss through the backward and
    the embedding's gradients from both stages (lookups, MTP) are added."""
    ranks = [r["pp"] for r in two_ranks]
    _assert_same_run(reference, ranks)
    assert not any(n.startswith("model.layers.1.") for n in ranks[0]["grads"])  # stage 0
    assert not any(n.startswith("model.layers.0.") for n in ranks[1]["grads"])  # stage 1


def test_pipeline_composes_with_data_and_expert_parallel_on_four_processes(reference, tmp_path):
    """pp=2 x dp=2 (ep=2 over the DP ranks of each stage): two pipelines, each over its DP
    rank's rows (1 row per micro-batch, 2 micro-batches), the stages' dense gradients
    all-reduced over DP (weights replicated under PP), their experts exchanged by EP."""
    _assert_same_run(reference, run_ranks(train_case, 4, tmp_path, {"pp": 2, "ep": 2}, STEPS, 2, 2,
                                          timeout=400))


@pytest.mark.slow  # 4 processes again
def test_pipeline_composes_with_tensor_parallel_on_four_processes(reference, tmp_path):
    """pp=2 x tp=2: each stage's MLA heads and dense FFN split over its 2 TP ranks."""
    _assert_same_run(reference, run_ranks(train_case, 4, tmp_path, {"pp": 2, "tp": 2}, STEPS, 2, 2,
                                          timeout=400))


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


def test_report_shows_the_placement_of_a_distributed_run():
    from nanoseek.reports.distributed import parallel_section
    row = {"step": 1, "elapsed": 1.0, "grad_norm": 2.0, "ranks_per_token": 1.5, "ranks_per_token_max": 2,
           "ranks_bound": 2, "a2a_remote_slots": 100, "a2a_bytes": 38400, "load_per_rank": [120, 80],
           "a2a_s": 0.1, "expert_grad_norm_max": 0.3, "expert_grad_norm_mean": 0.1, "expert_grad_norm_min": 0.0}
    train = [row, {**row, "step": 2, "elapsed": 2.0}]
    assert parallel_section({}, train) == []  # a single-process run has no such section
    text = "\n".join(parallel_section({"parallel": {"world": 2, "dp": 2, "ep": 2, "tp": 1,
                                                    "backend": "gloo"}}, train))
    assert "1.500 (max 2, bound 2)" in text and "120, 80 (max/mean 1.200)" in text
    assert "10.0 % of the step" in text and "FSDP2 over dense weights" in text
    text = "\n".join(parallel_section({"parallel": {"world": 4, "dp": 2, "ep": 1, "tp": 1, "pp": 2,
                                                    "replicate": True, "backend": "gloo"}}, train))
    assert "dense weights replicated, gradients all-reduced" in text


@pytest.mark.slow  # two torchrun processes train a tiny model end to end (~40 s)
def test_nanoseek_pretrain_nproc_2_runs_under_torchrun(tmp_path):
    import json
    import subprocess
    import sys
    from nanoseek import from_pretrained
    from tests.train_utils import write_corpus
    corpus = write_corpus(tmp_path / "c.txt", 40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--nproc", "2", "--ep", "2", "--out", str(out),
           "--data", str(corpus), "--max-steps", "3", "--batch-size", "2", "--seq-len", "32",
           "--eval-every", "3", "--eval-tokens", "128", "--sample-tokens", "2", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 3 steps") == 1  # rank 0 alone reports
    run = json.loads((out / "run.json").read_text())
    assert run["parallel"]["ep"] == 2 and run["summary"]["steps"] == 3
    assert (out / "checkpoint" / ".metadata").exists()
    model = from_pretrained(out)  # the consolidated HF directory: every expert
    assert len(model.model.layers[1].mlp.experts) == model.config.n_routed_experts
