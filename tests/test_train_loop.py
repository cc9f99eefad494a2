import math

import pytest
import torch

from nanoseek.model import CausalLM
from nanoseek.train.loop import TrainConfig, Trainer, max_violation, param_groups, read_metrics
from nanoseek.train.schedule import lr_at
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules():
    assert lr_at(0, 1.0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    mid = lr_at(55, 1.0, 100, warmup_steps=10, min_lr_ratio=0.0)
    assert mid == pytest.approx(0.5)
    wsd = [lr_at(s, 1.0, 100, 10, "wsd", 0.0, decay_frac=0.2) for s in range(101)]
    assert wsd[10:80] == [1.0] * 70 and wsd[90] == pytest.approx(0.5) and wsd[100] == 0.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, 10, schedule="linear")


def _batches(vocab, B=4, S=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(3, vocab, (64, S + 1), generator=g)
    pool[:, 1::2] = (pool[:, 0::2][:, :pool[:, 1::2].shape[1]] + 1) % vocab  # learnable: odd = even + 1

    def next_batch(step, micro):
        idx = torch.randint(0, 64, (B,), generator=torch.Generator().manual_seed(step * 31 + micro))
        rows = pool[idx]
        return rows[:, :-1], rows[:, 1:]
    return next_batch


def _loss(model, batch, targets):
    out = model.loss(*batch, num_targets=targets.count, num_batches=targets.micro_batches)
    return out.loss, {"lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}


def _trainer(tmp_path, cfg=None, **kw):
    torch.manual_seed(0)
    model = CausalLM(cfg or micro_config())
    tc = TrainConfig(**{"max_steps": 30, "lr": 1e-2, "warmup_steps": 3, "eval_every": 0,
                        "save_every": 0, **kw})
    return Trainer(model, tc, tmp_path, _batches(model.config.vocab_size, B=tc.batch_size),
                   _loss, count_targets=lambda b: model.loss_targets(b[1]), progress=False)


def test_loss_falls_and_metrics_are_logged(tmp_path):
    tr = _trainer(tmp_path, batch_size=4)
    bias = [m.gate.e_score_correction_bias.clone() for m in tr.model.moe_layers()]
    summary = tr.fit()
    rec = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rec] == list(range(1, 31)) and summary["steps"] == 30
    assert rec[-1]["lm_loss"] < rec[0]["lm_loss"] - 1.0
    assert rec[0]["mtp_loss"] is not None and rec[0]["aux_loss"] > 0
    assert len(rec[0]["max_violation"]) == len(tr.model.moe_layers()) == 2  # layer 1 + MTP
    assert rec[-1]["tokens"] == 30 * 4 * 24
    # the aux-loss-free update moved the router biases and reset the load counters
    assert any(not torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(bias, tr.model.moe_layers()))
    assert all(float(m.tokens_per_expert.sum()) == 0 for m in tr.model.moe_layers())
    assert (tmp_path / "train_state.pt").exists()


def test_grad_accumulation_matches_the_big_batch(tmp_path):
    """2 micro-batches of 2 == 1 batch of 4: same gradients (loads summed over the step)."""
    def grads(accum, B):
        torch.manual_seed(0)
        model = CausalLM(micro_config())
        tc = TrainConfig(max_steps=1, batch_size=B, grad_accum=accum, lr=1e-3, warmup_steps=0,
                         eval_every=0, save_every=0)
        full = _batches(model.config.vocab_size, B=4)

        def next_batch(step, micro):
            x, y = full(step, 0)
            return x[micro * B:(micro + 1) * B], y[micro * B:(micro + 1) * B]
        tr = Trainer(model, tc, tmp_path / f"a{accum}", next_batch, _loss,
                     count_targets=lambda b: model.loss_targets(b[1]), progress=False)
        seen = {}
        orig = tr.optimizer.step

        def spy(*a, **k):
            seen["g"] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            seen["load"] = [m.tokens_per_expert.clone() for m in model.moe_layers()]
            return orig(*a, **k)
        tr.optimizer.step = spy
        tr.train_step()
        return seen
    a, b = grads(1, 4), grads(2, 2)
    for ga, gb in zip(a["g"], b["g"]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    for la, lb in zip(a["load"], b["load"]):
        assert torch.equal(la, lb) and la.sum() > 0


def test_no_weight_decay_on_norms_and_embeddings():
    model = CausalLM(micro_config())
    decay, no_decay = param_groups(model, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.model.embed_tokens.weight) in ids and id(model.model.norm.weight) in ids
    assert id(model.lm_head.weight) not in ids and decay["weight_decay"] == 0.1


def test_router_is_not_decayed():
    model = CausalLM(micro_config())
    decay, no_decay = param_groups(model, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    gates = [m.gate.weight for m in model.moe_layers()]
    assert gates and all(id(g) in ids for g in gates)
    assert all(id(p) not in ids for n, p in model.named_parameters() if n.endswith("gate_proj.weight"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_options_train(tmp_path, precision):
    tr = _trainer(tmp_path, max_steps=4, precision=precision)
    tr.fit()
    rec = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(rec) == 4 and all(math.isfinite(r["loss"]) for r in rec)
    assert tr.scaler.is_enabled() == (precision == "fp16")


def test_time_limit_stops_and_decays(tmp_path):
    tr = _trainer(tmp_path, max_steps=10_000, time_limit=1.0, warmup_steps=0)
    tr.elapsed = 0.9  # as if 90 % of the time budget were gone after 0 steps
    s = tr.fit()
    assert s["stopped_early"] and s["steps"] < 10_000
    rec = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert rec[-1]["lr"] < 0.2 * 1e-2  # the schedule followed the clock to its end


@pytest.mark.parametrize("clock,steps", [("wall", 1), ("cpu", 3)])
def test_the_cpu_clock_does_not_count_time_the_process_waits(tmp_path, clock, steps):
    """A step that sleeps 1 s (a busy machine's stall) spends a 0.9 s wall budget at once,
    and next to nothing of a CPU-seconds budget (a step of this model: well under 0.3 CPU s)."""
    import time
    tr = _trainer(tmp_path, max_steps=3, time_limit=0.9, warmup_steps=0, clock=clock)
    step = tr.train_step
    tr.train_step = lambda: (time.sleep(1.0), step())[1]
    assert tr.fit()["steps"] == steps


def test_time_limit_spent_before_a_resume_trains_no_extra_step(tmp_path):
    tr = _trainer(tmp_path, max_steps=20, time_limit=1.0, save_every=1)
    tr.fit(until=4)
    assert tr.step == 4
    again = _trainer(tmp_path, max_steps=20, time_limit=1.0, save_every=1)
    assert again.resume() and again.step == 4
    again.elapsed = 1.5  # the budget ran out before this process started
    s = again.fit()
    assert s["steps"] == 4 and s["stopped_early"]
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_fresh_fit_drops_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    tr = _trainer(tmp_path, max_steps=2)
    tr.fit()  # as if killed after logging 2 steps, before any train_state.pt
    (tmp_path / "train_state.pt").unlink(missing_ok=True)
    again = _trainer(tmp_path, max_steps=4)
    assert not again.resume()
    again.fit()
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_max_violation():
    assert max_violation(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 0
    assert max_violation(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx(3.0)


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="'schedule'"):
        _trainer(tmp_path, schedule="linear")
    with pytest.raises(ValueError, match="'batch_size'"):
        _trainer(tmp_path, batch_size=0)


def test_thread_tuner_switches_to_the_faster_count():
    from nanoseek.train.numerics.threads import ThreadTuner
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(max_threads=2, every=5)
        used = []
        for step in range(12):
            n = tuner.before_step(step)
            used.append(n)
            tuner.after_step(1.0 if n == 2 else 0.3)  # one thread is 3x faster here
        assert used[:5] == [2] * 5 and used[5] == 1 and used[6:10] == [1] * 4
        assert used[10] == 2 and used[11] == 1  # it re-checks the other count, which lost
        assert tuner.current == 1
        slow = ThreadTuner(max_threads=2, every=5)
        for step in range(12):
            n = slow.before_step(step)
            slow.after_step(1.0 if n == 2 else 1.5)
        assert slow.current == 2  # the trial lost: stay
    finally:
        torch.set_num_threads(before)


def test_router_z_loss_is_optional_and_logged(tmp_path):
    def aux(coef):
        tr = _trainer(tmp_path / str(coef), cfg=micro_config(router_z_loss_coef=coef), max_steps=1)
        return tr.train_step()["aux_loss"]
    assert aux(0.01) > aux(0.0) > 0


def _step_grads(micro_batches, batch, loss_fn=_loss, cfg=None):
    """Gradients of one optimizer step over `batch` (x, y) split into `micro_batches`."""
    torch.manual_seed(0)
    model = CausalLM(cfg or micro_config())
    B = batch[0].shape[0] // micro_batches
    tc = TrainConfig(max_steps=1, batch_size=B, grad_accum=micro_batches, warmup_steps=0,
                     grad_clip=0.0, eval_every=0, save_every=0)
    tr = Trainer(model, tc, "unused", lambda step, m: tuple(t[m * B:(m + 1) * B] for t in batch),
                 loss_fn, count_targets=lambda b: model.loss_targets(b[1]), progress=False)
    seen = {}
    orig = tr.optimizer.step

    def spy(*a, **k):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return orig(*a, **k)
    tr.optimizer.step = spy
    metrics = tr.train_step()
    return seen, metrics


def _masked_batch(vocab, B=8, S=24):
    """Labels masked (IGNORE_INDEX) unevenly: rows 0-1 keep 2 targets each, rows 2-3 keep
    half, rows 4-7 keep all; as 4 micro-batches of 2 they hold 4, 24, 48, 48 targets."""
    from nanoseek.model.transformer import IGNORE_INDEX
    x, y = _batches(vocab, B=B, S=S)(0, 0)
    y = y.clone()
    y[0:2, 2:] = IGNORE_INDEX
    y[2:4, ::2] = IGNORE_INDEX
    return x, y


def test_accumulated_masked_loss_weighs_every_target_token_the_same():
    """One batch of 8 == 4 micro-batches of 2 whose masks leave them 4, 24, 48 and 48
    targets: the loss is the step's per-token sum over its global target count (MTP and the
    z-loss included), not the mean of the micro-batches' means."""
    cfg = micro_config(router_z_loss_coef=0.01)
    batch = _masked_batch(cfg.vocab_size)
    big, m_big = _step_grads(1, batch, cfg=cfg)
    acc, m_acc = _step_grads(4, batch, cfg=cfg)
    assert big.keys() == acc.keys() and len(big) > 20
    delta = max(float((big[n] - acc[n]).abs().max()) for n in big)
    print(f"max |Δgrad| 1x8 vs 4x2 with uneven masks: {delta:.3e}")
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-6, msg=n)
    for k in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
        assert float(m_acc[k]) == pytest.approx(float(m_big[k]), rel=1e-5), k

    def mean_of_means(model, b, targets):  # the rule this replaces: each micro-batch's mean
        out = model.loss(*b)
        return out.loss / targets.micro_batches, {}
    old, _ = _step_grads(4, batch, mean_of_means, cfg=cfg)
    assert max(float((big[n] - old[n]).abs().max()) for n in big) > 100 * max(delta, 1e-8)


def test_step_metrics_stay_on_the_device_and_log_lines_average_their_interval(tmp_path):
    every = _trainer(tmp_path / "every", max_steps=7)
    m = every.train_step()
    assert torch.is_tensor(m["loss"]) and torch.is_tensor(m["grad_norm"])  # no sync per step
    every = _trainer(tmp_path / "every", max_steps=7)
    every.fit()
    third = _trainer(tmp_path / "third", max_steps=7, log_every=3)
    third.fit()
    one = [r for r in read_metrics(tmp_path / "every") if r["kind"] == "train"]
    three = [r for r in read_metrics(tmp_path / "third") if r["kind"] == "train"]
    assert [r["step"] for r in three] == [3, 6, 7]  # the last, partial interval too
    for rec, steps in zip(three, ([1, 2, 3], [4, 5, 6], [7])):
        for k in ("loss", "lm_loss", "grad_norm"):
            want = sum(one[s - 1][k] for s in steps) / len(steps)
            assert rec[k] == pytest.approx(want, rel=1e-5), (rec["step"], k)
        assert rec["lr"] == one[steps[-1] - 1]["lr"] and rec["tokens"] == one[steps[-1] - 1]["tokens"]


def test_evaluation_counts_no_expert_load(tmp_path):
    """Eval-mode forwards (validation, samples, a frozen reference) leave the MoE load
    counters alone, so a run that evaluates every step moves its router biases exactly as
    one that never evaluates."""
    model = CausalLM(micro_config())
    x = torch.randint(3, model.config.vocab_size, (2, 16))
    model.eval()
    with torch.no_grad():
        model.loss(x, x)  # the main model's MoE layer and the MTP module's
    assert all(float(m.tokens_per_expert.sum()) == 0 for m in model.moe_layers())
    model.train()
    model.loss(x, x)
    assert all(float(m.tokens_per_expert.sum()) > 0 for m in model.moe_layers())

    def evaluate(model):
        assert not model.training
        model(x)
        return {"val_loss": 0.0}
    plain = _trainer(tmp_path / "plain", max_steps=4)
    plain.fit()
    evald = _trainer(tmp_path / "eval", max_steps=4, eval_every=1)
    evald.evaluate = evaluate
    evald.train_step()
    loads = [m.tokens_per_expert.clone() for m in evald.model.moe_layers()]
    evald.run_eval()
    assert all(torch.equal(a, m.tokens_per_expert) for a, m in zip(loads, evald.model.moe_layers()))
    evald.fit()
    for a, b in zip(plain.model.moe_layers(), evald.model.moe_layers()):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)


def test_stop_when_ends_the_run_at_the_target_and_a_resume_trains_no_further(tmp_path):
    """Early stopping on a measured target: the run stops at the first evaluation that meets
    it (not before, not after), saves there, and a resume of it does not train on."""
    seen = []

    def evaluate(model):
        seen.append(1)
        return {"accuracy": 0.1 * len(seen)}  # 0.1, 0.2, 0.3, ... at steps 4, 8, 12, ...

    def make():
        tr = _trainer(tmp_path, max_steps=40, eval_every=4, save_every=0)
        tr.evaluate = evaluate
        tr.stop_when = lambda ev: f"accuracy {ev['accuracy']:.1f}" if ev["accuracy"] >= 0.25 else None
        return tr
    s = make().fit()
    assert s["steps"] == 12 and s["stopped_early"] and s["target_reached"] == "accuracy 0.3"
    evals = [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert evals == [4, 8, 12]
    again = make()
    assert again.resume() and again.step == 12 and again.target_reached == "accuracy 0.3"
    assert again.fit()["steps"] == 12 and len(seen) == 3


def test_a_time_limited_run_still_warms_up_in_steps(tmp_path):
    """The clock may push the decay along (a slow machine still ends decayed), never skip
    the warm-up: with a generous max_steps the time fraction alone would mean 'past it'."""
    tr = _trainer(tmp_path, max_steps=10_000, warmup_steps=10, time_limit=100.0, schedule="constant")
    tr.elapsed = 20.0  # a fifth of the budget gone: 2,000 "steps" by the clock
    assert [tr.lr(s) for s in (0, 4, 9)] == pytest.approx([1e-3, 5e-3, 1e-2])
    assert tr.lr(10) == pytest.approx(1e-2)
    cos = _trainer(tmp_path, max_steps=10_000, warmup_steps=10, time_limit=100.0)
    cos.elapsed = 90.0
    assert cos.lr(11) < 0.2 * 1e-2  # after the warm-up the clock still drives the decay
