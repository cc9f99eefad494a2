"""SFT and GRPO under the distributed launch (2 gloo processes, as torchrun would start
them) equal the single-process run.

SFT, dp=2 with FSDP2 (and dp=2 with ep=2): each rank trains on its rows of the global
micro-batch; the per-step losses and gradient norms equal one process's to 1e-5 relative
(fp32), and so do the loss before and after and the consolidated checkpoint (1e-5).
GRPO, dp=2 with replicated weights: with a fixed rollout (a stand-in sampler whose
completions, lengths and rewards are a function of each completion's seed alone, so the
test fails if a rank samples the wrong prompts or seeds, normalises by its own counts, or
scales advantages by its own std) the first step's gradients (max |Δ| <= 1e-5, measured
~3e-8) and both steps' losses and logged statistics equal one process's, for the "grpo"
loss with batch-scaled rewards and the token-level "dapo" loss; the two ranks sampled
disjoint halves of the prompts. Then a real run (the engine samples) of two steps: the
weights stay identical on both ranks, and rank 0 alone wrote metrics and the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from tests.parallel_utils import full_grads, run_ranks, train_steps
from tests.posttrain_utils import PAIRS, make_init, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

GRPO_CASES = {"grpo_batch": dict(loss_type="grpo", scale_rewards="batch"),
              "dapo": dict(loss_type="dapo", scale_rewards="group")}


def quiet(*a, **k):
    pass


# ---------------------------------------------------------------------------- SFT
def sft_config(init, data):
    from nanoseek.train.posttrain.sft import SFTConfig, sft_train_config
    return SFTConfig(init=str(init), data=[str(data)],
                     train=sft_train_config(max_steps=3, batch_size=2, grad_accum=2, seq_len=64,
                                            lr=1e-2, warmup_steps=0, save_every=3))


def sft_case(out: Path, init, data, layout=None) -> dict:
    from nanoseek.train.posttrain.sft import sft
    run = sft(out, sft_config(init, data), progress=False, log=quiet, parallel=layout)
    return {"before": run["loss_before"], "after": run["loss_after"]}


# --------------------------------------------------------------------------- GRPO
def fake_rollouts(llm, task, examples, group_size, params, seed, make_room=None):
    """Completion k of prompt i is drawn from seed + i*G + k alone: 1-8 tokens, a reward in
    [0, 1); the prompts asked for are recorded."""
    from nanoseek.data.tasks.prompting import prompt_ids
    from nanoseek.train.rl.rollout import Rollouts
    SEEN.extend(ex.prompt for ex in examples)
    r = Rollouts([], [], [], [], torch.zeros(0))
    for i, ex in enumerate(examples):
        ids = prompt_ids(llm.tokenizer, task.prompt_messages(ex))
        for k in range(group_size):
            g = torch.Generator().manual_seed(seed + i * group_size + k)
            n = int(torch.randint(1, 9, (1,), generator=g))
            r.prompt_ids.append(ids)
            r.completion_ids.append(torch.randint(3, 384, (n,), generator=g).tolist())
            r.engine_logp.append([0.0] * n)
            r.truncated.append(n == 8)
            r.rewards = torch.cat([r.rewards, torch.rand(1, generator=g)])
    r.correct, r.components = r.rewards > 0.5, {"fake": r.rewards.clone()}
    return r


SEEN: list[str] = []


@contextlib.contextmanager
def sampler(fn):
    """The GRPO stage samples with `fn` (and records the prompts in SEEN), on test_grpo's
    vowels task (registered for the block only: other tests list the real tasks)."""
    from nanoseek.data.tasks import TASKS
    from nanoseek.train.rl import grpo
    from tests.test_grpo import Vowels
    real = grpo.sample_rollouts
    grpo.sample_rollouts, TASKS["vowels"] = fn, Vowels
    SEEN.clear()
    try:
        yield
    finally:
        grpo.sample_rollouts = real
        del TASKS["vowels"]


def recording(llm, task, examples, group_size, params, seed, make_room=None):
    from nanoseek.train.rl.rollout import sample_rollouts
    SEEN.extend(ex.prompt for ex in examples)
    return sample_rollouts(llm, task, examples, group_size, params, seed, make_room=make_room)


def grpo_config(init, **kw):
    from tests.test_grpo import config
    return config(init, train=dict(max_steps=2, batch_size=4, grad_accum=2, save_every=2), **kw)


def grpo_fixed_case(out: Path, init, rank_device, **kw) -> dict:
    """Two steps on fixed rollouts; the metrics, the first step's gradients, the prompts."""
    from nanoseek.train.rl.run import build
    with sampler(fake_rollouts):
        trainer, _ = build(out, grpo_config(init, **kw), progress=False, rank_device=rank_device)
        grads, step = {}, trainer.optimizer.step

        def spy(*a, **k):
            if not grads:
                grads.update(full_grads(trainer.model))
            return step(*a, **k)
        trainer.optimizer.step = spy
        metrics = train_steps(trainer, 2)
        return {"metrics": metrics, "grads": grads, "prompts": list(SEEN)}


def grpo_real_case(out: Path, init) -> dict:
    """`rl` itself, the engine sampling: two steps, evaluation, checkpoint."""
    from nanoseek.train.rl import run as rl_run
    built, build = [], rl_run.build
    rl_run.build = lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    try:
        with sampler(recording):
            rl_run.rl(out, grpo_config(init), progress=False, log=quiet)
            prompts = list(SEEN)
    finally:
        rl_run.build = build
    return {"state": {k: v.clone() for k, v in built[0][0].model.state_dict().items()},
            "prompts": prompts}


def on_two_ranks(rank, tmp: Path, init, data) -> dict:
    """Every case in one spawn (spawning costs more than these micro runs)."""
    from nanoseek.parallel import ParallelConfig
    cpu = torch.device("cpu")
    return {"sft_dp": sft_case(tmp / "sft_dp", init, data),
            "sft_ep": sft_case(tmp / "sft_ep", init, data, ParallelConfig(ep=2)),
            **{name: grpo_fixed_case(tmp / name, init, cpu, **kw) for name, kw in GRPO_CASES.items()},
            "grpo_real": grpo_real_case(tmp / "grpo_real", init)}


# -------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posttrain")
    data = write_jsonl(tmp / "sft.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    return make_init(tmp / "init"), data, tmp


@pytest.fixture(scope="module")
def two_ranks(files):
    init, data, tmp = files
    return run_ranks(on_two_ranks, 2, tmp / "ranks", tmp / "dist", init, data, timeout=300)


def train_records(out: Path) -> list[dict]:
    from nanoseek.train.run.metrics import read_metrics
    return [r for r in read_metrics(out) if r["kind"] == "train"]


def test_sft_on_two_ranks_equals_one_process(files, two_ranks, tmp_path):
    from nanoseek import from_pretrained
    init, data, tmp = files
    ref = sft_case(tmp_path / "one", init, data)
    ref_train = train_records(tmp_path / "one")
    ref_model = from_pretrained(tmp_path / "one").state_dict()
    for name in ("sft_dp", "sft_ep"):
        out = tmp / "dist" / name
        got = train_records(out)
        assert len(got) == len(ref_train) == 3
        for a, b in zip(got, ref_train):
            for k in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-5), (name, a["step"], k)
            assert a["tokens"] == b["tokens"]
        for r in two_ranks:  # every rank computed the same loss before and after
            assert r[name]["before"] == pytest.approx(ref["before"], rel=1e-5)
            assert r[name]["after"] == pytest.approx(ref["after"], rel=1e-5)
        assert json.loads((out / "run.json").read_text())["parallel"]["dp"] == 2
        model = from_pretrained(out).state_dict()  # rank 0's consolidation of the shards
        for k, v in ref_model.items():
            torch.testing.assert_close(model[k], v, rtol=0, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")


@pytest.mark.parametrize("case", GRPO_CASES)
def test_grpo_on_two_ranks_equals_one_process_on_a_fixed_rollout(files, two_ranks, tmp_path, case):
    init, _, _ = files
    ref = grpo_fixed_case(tmp_path / "one", init, None, **GRPO_CASES[case])
    ranks = [r[case] for r in two_ranks]
    assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() == ref["grads"].keys()
    delta = max(float((g[n] - ref["grads"][n]).abs().max()) for g in (r["grads"] for r in ranks)
                for n in g)
    print(f"{case}: max |Δgrad| = {delta:.1e}")
    assert delta <= 1e-5 and max(float(g.abs().max()) for g in ref["grads"].values()) > 1e-2
    for step in range(2):
        for r in ranks:
            got, want = r["metrics"][step], ref["metrics"][step]
            for k in ("loss", "grad_norm", "kl", "clip_frac", "ratio"):
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (case, step, k)
            for k in ("reward", "reward_std", "accuracy", "completion_len", "completion_len_max",
                      "truncated_frac", "groups_kept", "step_tokens"):
                assert got[k] == pytest.approx(want[k], rel=1e-6), (case, step, k)
    # each rank sampled its own half of each step's prompts: together, one process's
    half = [r["prompts"] for r in ranks]
    assert not set(half[0]) & set(half[1])
    assert sorted(half[0] + half[1]) == sorted(ref["prompts"]) and len(ref["prompts"]) == 8


def test_grpo_run_on_two_ranks_keeps_the_ranks_identical(files, two_ranks):
    from nanoseek import from_pretrained
    _, _, tmp = files
    a, b = (r["grpo_real"] for r in two_ranks)
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert not set(a["prompts"]) & set(b["prompts"]) and len(a["prompts"]) == 4  # 2 per step
    out = tmp / "dist" / "grpo_real"
    assert [r["step"] for r in train_records(out)] == [1, 2]  # written once, by rank 0
    run = json.loads((out / "run.json").read_text())
    assert run["parallel"] == {"dp": 2, "replicate": True} and run["final_eval"]["step"] == 2
    model = from_pretrained(out).state_dict()
    assert all(torch.equal(model[k], a["state"][k]) for k in model)


@pytest.mark.slow  # two torchrun launches of 2 processes each (~35 s)
def test_nanoseek_sft_and_grpo_nproc_2_run_under_torchrun(files, tmp_path):
    import subprocess
    import sys
    init, data, _ = files
    sft = [sys.executable, "-m", "nanoseek", "sft", "--nproc", "2", "--init", str(init), "--data", str(data),
           "--out", str(tmp_path / "sft"), "--max-steps", "2", "--seq-len", "64", "--batch-size", "2",
           "--no-progress"]
    grpo = [sys.executable, "-m", "nanoseek", "grpo", "--nproc", "2", "--init", str(tmp_path / "sft"),
            "--out", str(tmp_path / "grpo"), "--option", "digits=1", "--max-steps", "2", "--batch-size", "2",
            "--num-generations", "2", "--max-completion-length", "6", "--eval-n", "3", "--no-progress"]
    for cmd, line in ((sft, "done: 2 steps"), (grpo, "done: 2 steps")):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(line) == 1  # rank 0 alone reports
    for run in ("sft", "grpo"):
        assert (tmp_path / run / "checkpoint" / ".metadata").exists()
        assert (tmp_path / run / "model.safetensors").exists()
