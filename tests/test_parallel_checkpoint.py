"""Sharded checkpoints (torch.distributed.checkpoint): saved by 2 ranks (FSDP + EP=2),
resumed on 2 ranks and on 1 process, and consolidated into a plain HF directory; every
continuation equals the uninterrupted single-process run."""

import pytest
import torch

from tests.parallel_utils import make_trainer, run_ranks, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_pretrained(out):
    from nanoseek.checkpoint.hf import save_pretrained
    return lambda model, step: save_pretrained(model, out / "hf")


def _save_on_two_then_resume_on_two(rank, out):
    tr = make_trainer({"ep": 2}, steps=4, out_dir=out, on_checkpoint=_save_pretrained(out))
    train_steps(tr, 2)
    tr.save()
    from torch.distributed.tensor import DTensor
    state = {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
             for n, t in tr.model.state_dict().items()}
    again = make_trainer({"ep": 2}, steps=4, out_dir=out)
    assert again.resume() and again.step == 2
    return train_steps(again, 2), state


@pytest.fixture(scope="module")
def reference():
    tr = make_trainer(None, steps=4)
    first = train_steps(tr, 2)
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    return first + train_steps(tr, 2), state


def test_save_on_two_resume_on_two_and_on_one(tmp_path, reference):
    ref, state_at_2 = reference
    on_two = run_ranks(_save_on_two_then_resume_on_two, 2, tmp_path / "ranks", tmp_path, timeout=240)
    one = make_trainer(None, steps=4, out_dir=tmp_path)  # the same checkpoint, one process
    assert one.resume() and one.step == 2 and one.sharded
    on_one = train_steps(one, 2)
    for got in (on_two[0][0], on_two[1][0], on_one):
        for step in range(2):
            for k in ("loss", "lm_loss", "grad_norm"):
                assert got[step][k] == pytest.approx(ref[2 + step][k], rel=1e-5), (step, k)
    # the HF directory rank 0 consolidated is exactly the 2-rank model after step 2, every
    # expert in it (each rank held half), and close to the single-process one
    from nanoseek import from_pretrained
    hf = from_pretrained(tmp_path / "hf").state_dict()
    sharded = {**on_two[1][1], **on_two[0][1]}
    assert set(hf) == set(state_at_2) == set(sharded)
    for name, value in state_at_2.items():
        assert torch.equal(hf[name], sharded[name]), name
        torch.testing.assert_close(hf[name], value, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def _save_pipelined(rank, out):
    tr = make_trainer({"pp": 2}, steps=4, B=2, grad_accum=2, out_dir=out)
    train_steps(tr, 2)
    tr.save()
    return True


@pytest.mark.slow  # a second spawn
def test_pipeline_checkpoint_resumes_on_one_process(tmp_path, reference):
    """Each stage writes only the layers it trains (the rest is stale on that rank)."""
    ref, _ = reference
    run_ranks(_save_pipelined, 2, tmp_path / "ranks", tmp_path, timeout=240)
    one = make_trainer(None, steps=4, B=2, grad_accum=2, out_dir=tmp_path)
    assert one.resume() and one.step == 2
    for step, got in enumerate(train_steps(one, 2)):
        for k in ("loss", "lm_loss", "grad_norm"):
            assert got[k] == pytest.approx(ref[2 + step][k], rel=1e-5), (step, k)
