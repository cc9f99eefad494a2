"""On-policy distillation's objective (train/rl/opd.py): the chunked reverse KL through the
heads equals a plain float64 reference in value and gradient, its gradient is the
expectation of the sampled-token (policy-gradient) estimate, and its value the expectation
of the sampled log-ratio."""

import pytest
import torch

from nanoseek.train.rl.opd import head_reverse_kl, reverse_kl


def heads(vocab=37, d=8, dt=6, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.nn.Linear(d, vocab, bias=False)
    t = torch.nn.Linear(dt, vocab, bias=False)
    with torch.no_grad():
        s.weight.copy_(torch.randn(vocab, d, generator=g))
        t.weight.copy_(torch.randn(vocab, dt, generator=g))
    h = torch.randn(n, d, generator=g, requires_grad=True)
    ht = torch.randn(n, dt, generator=g)
    return s, t, h, ht


def reference(s, t, h, ht, T):
    """KL in float64 from its definition, Σ_v p_v (log p_v − log q_v)."""
    z = (h.double() @ s.weight.double().t()) / T
    zt = (ht.double() @ t.weight.double().t()) / T
    p, q = torch.softmax(z, -1), torch.softmax(zt, -1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("T,rows", [(1.0, 3), (0.7, 4), (1.0, 64)])
def test_chunked_kl_equals_float64_reference_in_value_and_gradient(T, rows):
    s, t, h, ht = heads()
    w = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(1))
    kl = head_reverse_kl(s, h, t, ht, T, chunk_rows=rows)
    (kl * w).sum().backward()
    gh, gw = h.grad.clone(), s.weight.grad.clone()
    assert t.weight.grad is None  # the teacher gets nothing
    h.grad, s.weight.grad = None, None
    ref = reference(s, t, h, ht, T)
    (ref * w.double()).sum().backward()
    assert torch.allclose(kl.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gh.double(), h.grad.double(), atol=1e-5, rtol=1e-4)
    assert torch.allclose(gw.double(), s.weight.grad.double(), atol=1e-5, rtol=1e-4)
    assert (kl >= 0).all()


def test_plain_expression_matches_and_is_zero_for_equal_models():
    s, t, h, ht = heads()
    z, zt = s(h), t(ht)
    assert torch.allclose(reverse_kl(z, zt).double(), reference(s, t, h, ht, 1.0), atol=1e-5)
    assert torch.allclose(reverse_kl(z, z), torch.zeros(len(z)), atol=1e-6)
    assert torch.allclose(head_reverse_kl(s, h, s, h.detach()), torch.zeros(len(z)), atol=1e-5)


def test_gradient_is_the_expectation_of_the_sampled_token_estimate():
    """Σ_y p(y) (log p(y) − log q(y)) ∇log p(y) = ∇KL: the token-level policy-gradient
    estimate's expectation, summed exactly over the vocabulary, is the full-vocabulary
    gradient (what V4 computes without sampling)."""
    s, t, h, ht = heads(n=3)
    head_reverse_kl(s, h, t, ht).sum().backward()
    full = s.weight.grad.clone()
    s.weight.grad = None
    z = h @ s.weight.t()
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(ht @ t.weight.t(), -1).detach()
    reward = (log_p - log_q).detach()  # the sampled token's log-ratio, per candidate y
    surrogate = (log_p.exp().detach() * reward * log_p).sum()
    surrogate.backward()
    assert torch.allclose(full, s.weight.grad, atol=1e-5, rtol=1e-4)


def test_value_is_the_expectation_of_the_sampled_log_ratio():
    s, t, h, ht = heads(n=2, vocab=13)
    with torch.no_grad():
        kl = head_reverse_kl(s, h, t, ht)
        log_p = torch.log_softmax(s(h), -1)
        log_q = torch.log_softmax(t(ht), -1)
    g = torch.Generator().manual_seed(3)
    y = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=g)  # [N, M]
    estimate = (log_p.gather(1, y) - log_q.gather(1, y)).mean(1)
    assert torch.allclose(estimate, kl, atol=0.03), (estimate, kl)


def test_mismatched_vocabularies_are_refused():
    s, _, h, _ = heads()
    t = torch.nn.Linear(6, 40, bias=False)
    with pytest.raises(ValueError, match="vocabulary"):
        head_reverse_kl(s, h, t, torch.randn(len(h), 6))


# ------------------------------------------------------------------ the stage, end to end
import json  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek.data.tasks import TASKS  # noqa: E402
from nanoseek.model import CausalLM  # noqa: E402
from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from nanoseek.train.rl.config import rl_train_config  # noqa: E402
from nanoseek.train.rl.distill import distill  # noqa: E402
from nanoseek.train.rl.distill_config import DistillConfig  # noqa: E402
from nanoseek.train.run.metrics import read_metrics  # noqa: E402
from tests.test_grpo import Vowels  # noqa: E402
from tests.train_utils import micro_config, small_corpus  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A student and two teachers (other random weights), one tokenizer."""
    root = tmp_path_factory.mktemp("opd")
    tok = train_tokenizer(small_corpus(60), vocab_size=384)
    dirs = []
    for name, seed in (("student", 0), ("t1", 1), ("t2", 2)):
        torch.manual_seed(seed)
        nanoseek.save_pretrained(CausalLM(micro_config()).eval(), root / name)
        save_tokenizer(tok, root / name)
        dirs.append(root / name)
    return dirs


@pytest.fixture
def vowels(monkeypatch):
    monkeypatch.setitem(TASKS, "vowels", Vowels)


def dcfg(models, **kw) -> DistillConfig:
    student, t1, t2 = models
    train = dict(max_steps=3, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=0, eval_every=0,
                 save_every=3)
    train.update(kw.pop("train", {}))
    base = dict(init=str(student), teachers=[str(t1), str(t2)], tasks=["vowels", "vowels"],
                train=rl_train_config(**train), num_generations=2, eval_n=4,
                max_completion_length=8)
    return DistillConfig(**{**base, **kw})


def records(out, kind="train"):
    return [r for r in read_metrics(out) if r["kind"] == kind]


def test_distillation_lowers_the_kl_to_each_teacher(models, vowels, tmp_path):
    cfg = dcfg(models, teachers=[str(models[1])], tasks=["vowels"], num_generations=4,
               train=dict(max_steps=12, grad_accum=1, save_every=12))
    run = distill(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    kl = [r["kl"] for r in records(tmp_path / "run")]
    assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, kl
    assert run["stage"] == "opd" and "accuracy_vowels" in run["final_eval"]


def test_two_teachers_off_policy_and_resume(models, vowels, tmp_path):
    out = tmp_path / "run"
    cfg = dcfg(models, samples_from="teacher", train=dict(max_steps=2, save_every=2))
    distill(out, cfg, progress=False, log=lambda *a: None)
    first = records(out)
    assert len(first) == 2 and all("nll" in r for r in first)
    ev = records(out, "eval")[-1]
    assert {"accuracy_vowels0", "accuracy_vowels1", "accuracy"} <= set(ev)
    cfg.train.max_steps = 3
    distill(out, cfg, resume=True, progress=False, log=lambda *a: None)
    assert [r["step"] for r in records(out)][-1] == 3
    assert json.loads((out / "run.json").read_text())["settings"]["samples_from"] == "teacher"


def test_cold_start_learns_from_the_teachers_samples_then_from_its_own(models, vowels, tmp_path):
    """cold_start_steps=2: steps 1-2 are off-policy (NLL of the teachers' samples, exactly
    the off-policy run's first two steps), steps 3-4 on-policy (KL)."""
    cold = distill(tmp_path / "cold", dcfg(models, cold_start_steps=2, train=dict(max_steps=4, save_every=4)),
                   progress=False, log=lambda *a: None)
    recs = records(tmp_path / "cold")
    assert [("nll" in r, "kl" in r, r["off_policy"]) for r in recs] == \
        [(True, False, 1.0)] * 2 + [(False, True, 0.0)] * 2
    distill(tmp_path / "off", dcfg(models, samples_from="teacher", train=dict(max_steps=4, save_every=4)),
            progress=False, log=lambda *a: None)
    off = records(tmp_path / "off")
    assert [r["nll"] for r in recs[:2]] == [r["nll"] for r in off[:2]]
    assert cold["settings"]["cold_start_steps"] == 2


def test_on_policy_steps_take_their_own_learning_rate(models, vowels, tmp_path):
    """on_policy_lr: the cold start's steps keep the schedule's rate, the student's own
    steps take on_policy_lr on the same schedule (here a quarter of --lr)."""
    def lrs(name, **change):
        cfg = dcfg(models, cold_start_steps=2, train=dict(max_steps=4, save_every=4), **change)
        run = distill(tmp_path / name, cfg, progress=False, log=lambda *a: None)
        return [r["lr"] for r in records(tmp_path / name)], run, cfg
    plain, _, cfg = lrs("plain")
    own, run, _ = lrs("own", on_policy_lr=cfg.train.lr / 4)
    assert own[:2] == plain[:2] and all(p > 0 for p in plain)
    assert own[2:] == pytest.approx([p / 4 for p in plain[2:]], rel=1e-9)
    assert run["settings"]["on_policy_lr"] == cfg.train.lr / 4


@pytest.mark.parametrize("change,match", [
    (dict(cold_start_steps=2, samples_from="teacher"), "only for on-policy"),
    (dict(on_policy_lr=1e-4, samples_from="teacher"), "on_policy_lr"),
    (dict(on_policy_lr=0.0), "on_policy_lr"),
    (dict(cold_start_steps=3, num_iterations=2, train=dict(save_every=4)), "multiple of num_iterations"),
    (dict(cold_start_steps=-1), "cold_start_steps"),
    (dict(teachers=["x"]), "one --teacher per --task"),
    (dict(teacher_weights=[1.0]), "one weight per teacher"),
    (dict(teacher_weights=[1.0, -1.0]), "> 0"),
    (dict(train=dict(batch_size=3)), "split evenly"),
])
def test_bad_settings_are_refused(models, change, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        distill(tmp_path / "r", dcfg(models, **change), progress=False, log=lambda *a: None)


def test_missing_teacher_and_other_tokenizer_are_refused(models, vowels, tmp_path):
    with pytest.raises(FileNotFoundError, match="--teacher .*no such directory"):
        distill(tmp_path / "a", dcfg(models, teachers=[str(models[1]), str(tmp_path / "none")]),
                progress=False, log=lambda *a: None)
    other = tmp_path / "other"
    torch.manual_seed(3)
    nanoseek.save_pretrained(CausalLM(micro_config()).eval(), other)
    save_tokenizer(train_tokenizer(small_corpus(30), vocab_size=300), other)
    with pytest.raises(ValueError, match="tokenizer differs"):
        distill(tmp_path / "b", dcfg(models, teachers=[str(models[1]), str(other)]),
                progress=False, log=lambda *a: None)


def run_cli(args, timeout=600):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "nanoseek", "distill", *args], capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # three CLI runs, two of them torchrun launches of 2 processes (~1-2 min)
def test_cli_on_two_processes_takes_one_process_first_step(models, tmp_path):
    """dp=2: each rank samples its share of each task's prompts with the one-process seeds and
    the loss's divisors are global, so the first step (same weights, same samples) logs the
    one-process KL; the run's checkpoint is consolidated; --resume continues it."""
    student, t1, t2 = models
    common = ["--student", str(student), "--teacher", str(t1), "--task", "arithmetic",
              "--teacher", str(t2), "--task", "countdown", "--option", "arithmetic.digits=1",
              "--max-steps", "2", "--batch-size", "4", "--num-generations", "2",
              "--max-completion-length", "6", "--eval-n", "4", "--lr", "1e-2", "--warmup-steps", "0",
              "--no-progress"]
    one = run_cli([*common, "--out", str(tmp_path / "one")])
    two = run_cli([*common, "--out", str(tmp_path / "two"), "--nproc", "2"])
    assert one.count("done: 2 steps") == 1 and two.count("done: 2 steps") == 1
    a, b = records(tmp_path / "one")[0], records(tmp_path / "two")[0]
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-4) and a["tokens"] == b["tokens"]
    assert (tmp_path / "two" / "model.safetensors").exists()
    run_cli(["--out", str(tmp_path / "one"), "--resume", "--max-steps", "3", "--no-progress"])
    assert records(tmp_path / "one")[-1]["step"] == 3


def test_cli_refuses_mismatched_teachers_and_tasks(models, tmp_path):
    from typer.testing import CliRunner

    from nanoseek.cli import app
    student, t1, _ = models
    res = CliRunner().invoke(app, ["distill", "--student", str(student), "--teacher", str(t1),
                                   "--task", "arithmetic", "--task", "countdown", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "one --teacher per --task" in res.output
    res = CliRunner().invoke(app, ["distill", "--student", str(student), "--teacher", str(t1),
                                   "--task", "arithmetic", "--option", "countdown.n=3", "--out", str(tmp_path / "y")])
    assert res.exit_code != 0 and "TASK.KEY=VALUE" in res.output
