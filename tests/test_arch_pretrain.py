"""Pretraining DeepSeek-V3.2 and V4 (`--preset tiny-v32`, `tiny-v4`): runs resume exactly,
save checkpoints transformers loads with the same logits, and log what the new pieces do
(indexer KL, hash-layer load, mHC comb error) while V3 runs log what they always did.
The presets are shrunk (vocabulary, width, top-k) so that a run takes a second or two;
32-token sequences still cross V4's sliding window (16), its HCA blocks (16) and many CSA
blocks (4), and top-k selects (8 of 32 keys for V3.2, 4 of 8 CSA entries for V4)."""

import json
import math

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.train.loop import TrainConfig, Trainer, read_metrics
from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain
from tests.train_utils import micro_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

SHRINK = {"tiny-v32": dict(vocab_size=384, hidden_size=64, index_topk=8, index_n_heads=16, max_position_embeddings=128),
          "tiny-v4": dict(vocab_size=384, hidden_size=64, index_topk=4, max_position_embeddings=128)}
TRAIN = dict(batch_size=2, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=3, eval_tokens=64,
             save_every=2, seed=5)
STEPS, PAUSE = 6, 3
QUIET = dict(progress=False, log=lambda *_: None, threads=1)
# the fields V3 records have always had; V3.2/V4 add theirs, V3 must not gain any
V3_TRAIN_FIELDS = {"kind", "step", "tokens", "elapsed", "tok_s", "loss", "lm_loss", "mtp_loss",
                   "aux_loss", "grad_norm", "max_violation", "lr", "mfu"}
NEW_FIELDS = {"tiny-v32": {"indexer_loss", "indexer_kl"},
              "tiny-v4": {"indexer_loss", "indexer_kl", "hash_max_load", "mhc_comb_error"}}


def _settings(name, corpus, tokenizer=None, max_steps=STEPS, **train):
    return PretrainConfig(model=preset(name, **SHRINK[name]),
                          train=TrainConfig(max_steps=max_steps, **{**TRAIN, **train}),
                          data=DataConfig(paths=[str(corpus)], tokenizer=tokenizer), sample_tokens=0)


def _train_records(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_docs=30)


@pytest.fixture(scope="module", params=["tiny-v32", "tiny-v4"])
def reference(request, tmp_path_factory, corpus):
    """(preset name, the uninterrupted run's directory)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(request.param) / "run"
    pretrain(out, _settings(request.param, corpus), **QUIET)
    return request.param, out


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, corpus, reference):
    name, ref = reference
    out = tmp_path / "run"
    orig_fit = Trainer.fit
    try:  # stop at PAUSE (a checkpoint there; the schedule still plans STEPS)
        Trainer.fit = lambda self, until=None: orig_fit(self, until=PAUSE)
        pretrain(out, _settings(name, corpus, tokenizer=str(ref)), **QUIET)
    finally:
        Trainer.fit = orig_fit
    assert [r["step"] for r in _train_records(out)] == list(range(1, PAUSE + 1))
    pretrain(out, _settings(name, corpus), resume=True, **QUIET)
    got, want = _train_records(out), _train_records(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):  # every logged value, the new pieces' included
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", *NEW_FIELDS[name]):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), (g["step"], key)
        assert g["max_violation"] == pytest.approx(w["max_violation"], abs=1e-4)
    evals = lambda d: {r["step"]: r["val_loss"] for r in read_metrics(d) if r["kind"] == "eval"}  # noqa: E731
    assert evals(out) == pytest.approx(evals(ref), rel=1e-6)
    a, b = nanoseek.from_pretrained(out).state_dict(), nanoseek.from_pretrained(ref).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_logs_what_each_new_piece_does(reference):
    name, ref = reference
    records = _train_records(ref)
    for r in records:
        assert set(r) == V3_TRAIN_FIELDS | NEW_FIELDS[name], r.keys()
        assert math.isfinite(r["indexer_kl"]) and r["indexer_kl"] >= 0
        # LossOutput.indexer_loss sums the layers' coef·L_I: with coef 1 it is the mean
        # KL times the number of indexers
        assert r["indexer_loss"] >= r["indexer_kl"] - 1e-6
    assert any(r["indexer_kl"] > 0 for r in records)  # the indexer is not yet the attention
    if name == "tiny-v4":
        run = json.loads((ref / "run.json").read_text())
        hash_names = [n for n in run["moe_layers"] if n.endswith("(hash)")]
        assert hash_names == ["layer 0 (hash)"]
        for r in records:
            assert len(r["hash_max_load"]) == 1 and r["hash_max_load"][0] >= 1.0
            # 20 Sinkhorn rounds leave comb nearly, not exactly, doubly stochastic
            assert 0 < r["mhc_comb_error"] < 0.05
        from nanoseek.reports.run_report import write_report
        text = write_report(ref).read_text()
        for needle in ("indexer KL to the main attention", "layer 0 (hash):", "mHC comb"):
            assert needle in text, needle


def test_checkpoint_loads_in_transformers_with_the_same_logits(reference):
    import transformers
    name, ref = reference
    cls = {"tiny-v32": transformers.DeepseekV32ForCausalLM, "tiny-v4": transformers.DeepseekV4ForCausalLM}[name]
    ours = nanoseek.from_pretrained(ref).eval()
    theirs = cls.from_pretrained(ref, dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - theirs(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


class _Counting(torch.nn.Module):
    """Stand-ins for the modules ArchMetrics reads: an indexer, a hyper-connection, a hash MoE."""

    def __init__(self):
        super().__init__()
        idx, hc, moe = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
        idx.indexer_loss, idx.loss_coef = None, 0.5
        hc.comb_error = None
        moe.is_hash = True
        moe.register_buffer("tokens_per_expert", torch.zeros(4))
        self.idx, self.hc, self.moe = idx, hc, moe

    def comb_error(self):  # the model-wide method of the same name is not a hyper-connection
        return 0.0


def test_arch_metrics_values_and_v3_absence():
    from nanoseek.model import CausalLM
    from nanoseek.train.numerics.arch_metrics import ArchMetrics, progress_fields

    from nanoseek.train.pretrain import pretrain_loss
    from nanoseek.train.targets import StepTargets

    model = CausalLM(micro_config())
    v3 = ArchMetrics(model)
    assert not v3 and v3.forward_shares(1.0) == {} and v3.step() == {}
    ids = torch.randint(3, 384, (2, 9))
    _, logs = pretrain_loss(model, (ids[:, :-1], ids[:, 1:]), StepTargets(model.loss_targets(ids[:, 1:]), 1))
    assert set(logs) == {"lm_loss", "mtp_loss", "aux_loss"}  # a V3 run's records keep their fields
    m = _Counting()
    am = ArchMetrics(m)
    assert am.indexers == [m.idx] and am.hyper_connections == [m.hc] and am.hash_moes == [m.moe]
    assert am.forward_shares(1.0) == {}  # nothing ran yet
    m.idx.indexer_loss, m.hc.comb_error = torch.tensor(0.3, requires_grad=True), torch.tensor(2e-6)
    m.moe.tokens_per_expert += torch.tensor([6.0, 1.0, 1.0, 0.0])
    got = am.forward_shares(0.25)
    assert got["indexer_kl"].item() == pytest.approx(0.3 / 0.5 * 0.25)  # without the coefficient
    assert got["mhc_comb_error"].item() == pytest.approx(0.5e-6)
    assert am.step()["hash_max_load"].tolist() == [3.0]  # 6 / mean 2
    assert progress_fields({"indexer_kl": 0.6, "hash_max_load": [3.0, 1.5], "mhc_comb_error": 2e-6}) == {
        "idx_kl": "0.600", "hash_load": "3.00", "comb_err": "2.0e-06"}
    assert progress_fields({"loss": 1.0}) == {}


def test_grad_accum_logs_the_mean_over_micro_batches(tmp_path):
    """Two micro-batches: the logged indexer KL is the mean of the two forwards' KLs."""
    from nanoseek.model import CausalLM
    from nanoseek.model.dsa import indexer_kl
    from nanoseek.train.pretrain import pretrain_loss

    torch.manual_seed(0)
    model = CausalLM(preset("tiny-v32", **SHRINK["tiny-v32"]))
    batches = [torch.randint(3, 384, (2, 33), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    kls = []
    for b in batches:  # the same weights the first step sees (before its optimizer step)
        model.train()
        model.loss(b[:, :-1], b[:, 1:])
        kls.append(indexer_kl(model))
    trainer = Trainer(model, TrainConfig(max_steps=1, batch_size=2, seq_len=32, grad_accum=2,
                                         precision="fp32", compile="off"), tmp_path,
                      next_batch=lambda step, micro: (batches[micro][:, :-1], batches[micro][:, 1:]),
                      loss_fn=pretrain_loss, count_targets=lambda b: model.loss_targets(b[1]),
                      progress=False)
    m = trainer.train_step()
    assert m["indexer_kl"].item() == pytest.approx(sum(kls) / 2, rel=1e-5)


def test_pretrain_help_explains_the_presets():
    from typer.testing import CliRunner

    from nanoseek.cli import app
    out = CliRunner().invoke(app, ["pretrain", "--help"], terminal_width=200).output
    flat = " ".join(out.split())
    for needle in ("tiny-v32", "tiny-v4", "lightning indexer", "mHC", "hash-routed", "deepseek-v4-flash"):
        assert needle in flat, needle
    flat = " ".join(CliRunner().invoke(app, ["speedrun", "--help"], terminal_width=200).output.split())
    assert "--preset" in flat and "--compare" in flat and "tiny-v4" in flat


def _fake_speedrun(run_dir, name, bpb=None, extra=None, val_bytes=5000):
    """A finished speedrun's run.json as recipes/speedrun.py writes it (old layouts: bpb=None)."""
    from nanoseek.recipes.speedrun import SPEEDRUN_BIAS_SPEED
    run_dir.mkdir(parents=True)
    run = {"nanoseek": "speedrun", "settings": {"model": preset(name, bias_update_speed=SPEEDRUN_BIAS_SPEED).to_dict()},
           "summary": {"steps": 380, "tokens_seen": 778240, "elapsed": 200.0},
           "data": {"val_docs": 30, "val_bytes": val_bytes, "val_tokens": 1500},
           "report_extra": extra or {}}
    if bpb is not None:
        run["speedrun"] = {"preset": name, "arch": "v3", "val_bpb": bpb, "wall_s": 260.0}
    (run_dir / "run.json").write_text(json.dumps(run))
    return run


def test_the_report_compares_with_the_v3_speedrun_beside_it(tmp_path):
    from nanoseek.recipes.speedrun import comparison, default_name, preset_of
    from nanoseek.reports.run_report import comparison_section

    assert default_name("tiny") == "speedrun" and default_name("tiny-v4") == "speedrun-tiny-v4"
    assert preset_of(preset("tiny-v4", bias_update_speed=0.01)) == "tiny-v4"
    out = tmp_path / "speedrun-tiny-v4"
    mine = _fake_speedrun(out, "tiny-v4")
    mine["speedrun"] = {"preset": "tiny-v4", "val_bpb": 1.40, "wall_s": 300.0}
    _fake_speedrun(tmp_path / "speedrun-tiny-v32", "tiny-v32", bpb=1.3)  # not V3: never the baseline

    none = comparison(out, mine, None)
    assert none["baseline"] is None
    text = "\n".join(comparison_section(none))
    assert "No V3 speedrun was found" in text and str(tmp_path / "speedrun") in text

    _fake_speedrun(tmp_path / "old", "tiny", extra={  # a run from before run.json's "speedrun" record
        "reloaded checkpoint: validation loss / bits per byte (all validation tokens)": "1.0400 / 1.5228"})
    c = comparison(out, mine, None)
    assert c["baseline"]["dir"] == str(tmp_path / "old") and c["baseline"]["val_bpb"] == 1.5228
    _fake_speedrun(tmp_path / "speedrun", "tiny", bpb=1.5165)  # ROOT/speedrun comes first
    c = comparison(out, mine, None)
    assert c["baseline"]["val_bpb"] == 1.5165 and c["baseline"]["same_validation_bytes"]
    text = "\n".join(comparison_section(c))
    assert "| 1.4000 | 1.5165 |" in text and "-0.1165: lower (better)" in text and "same validation bytes" in text

    _fake_speedrun(tmp_path / "other" / "v3", "tiny", bpb=1.6, val_bytes=999)  # --compare REPORT.md
    c = comparison(out, mine, tmp_path / "other" / "v3" / "report.md")
    assert c["baseline"]["val_bpb"] == 1.6 and not c["baseline"]["same_validation_bytes"]
    assert "not strictly comparable" in "\n".join(comparison_section(c))
    with pytest.raises(FileNotFoundError, match="compare"):
        comparison(out, mine, tmp_path / "nowhere")


def test_speedrun_refuses_a_preset_too_big_for_it(tmp_path):
    from nanoseek.recipes.speedrun import speedrun
    with pytest.raises(ValueError, match="'preset'.*tiny-v4"):
        speedrun("s", tmp_path, max_steps=1, preset_name="deepseek-v4-flash", progress=False,
                 log=lambda *_: None)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_speedrun_tiny_v4_end_to_end(tmp_path):
    """The whole speedrun on the real tiny-v4 preset, a few steps, beside a (short) V3 one."""
    from nanoseek.recipes.speedrun import speedrun
    small = dict(progress=False, log=lambda *_: None, threads=1, eval_tokens=512, warmup_steps=1)
    speedrun("speedrun", tmp_path, max_steps=2, **small)
    path = speedrun("speedrun-tiny-v4", tmp_path, max_steps=2, preset_name="tiny-v4", **small)
    run = json.loads((tmp_path / "speedrun-tiny-v4" / "run.json").read_text())
    assert run["speedrun"]["preset"] == "tiny-v4" and run["speedrun"]["arch"] == "v4"
    base = run["comparison"]["baseline"]
    assert base["dir"] == str(tmp_path / "speedrun") and base["same_validation_bytes"]
    text = path.read_text()
    for needle in ("Against the V3 speedrun", "indexer KL", "layer 0 (hash)", "mHC comb"):
        assert needle in text, needle
    # resumed without --preset: the run's own model, and the same comparison
    assert speedrun("speedrun-tiny-v4", tmp_path, resume=True, **small) == path
    assert json.loads((tmp_path / "speedrun-tiny-v4" / "run.json").read_text())["speedrun"]["preset"] == "tiny-v4"


@pytest.mark.parametrize("name", ["tiny-v32", "tiny-v4"])
def test_indexer_warm_up_trains_the_indexers_alone_then_everything(tmp_path, name):
    """--indexer-warmup-steps N (V3.2 §2.1.1): the first N steps run the indexers dense and
    move only their weights (the router biases held too); the steps after run sparse and
    move everything. A model without an indexer refuses the option."""
    from nanoseek.model import CausalLM
    from nanoseek.model.dsa import indexer_parameters, indexers
    from nanoseek.train.pretrain import pretrain_loss

    torch.manual_seed(0)
    model = CausalLM(preset(name, **SHRINK[name]))
    batch = torch.randint(3, 384, (2, 33), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(model, TrainConfig(max_steps=3, batch_size=2, seq_len=32, indexer_warmup_steps=2,
                                         warmup_steps=0, precision="fp32", compile="off"), tmp_path,
                      next_batch=lambda step, micro: (batch[:, :-1], batch[:, 1:]),
                      loss_fn=pretrain_loss, count_targets=lambda b: model.loss_targets(b[1]),
                      progress=False)
    indexer = {id(p) for p in indexer_parameters(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()
              if m.gate.e_score_correction_bias is not None]
    for _ in range(2):
        trainer.train_step()
        assert all(m.mode == "dense" for m in indexers(model))
    params = dict(model.named_parameters())
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert moved and all(id(params[n]) in indexer for n in moved), sorted(moved)
    assert all(torch.equal(a, m.gate.e_score_correction_bias) for a, m in
               zip(biases, [m for m in model.moe_layers() if m.gate.e_score_correction_bias is not None]))
    trainer.train_step()
    assert all(m.mode == "sparse" for m in indexers(model))
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert any(id(params[n]) not in indexer for n in moved)
    v3 = CausalLM(preset("tiny", vocab_size=384, hidden_size=64))
    with pytest.raises(ValueError, match="indexer_warmup_steps"):
        Trainer(v3, TrainConfig(max_steps=1, indexer_warmup_steps=1), tmp_path, next_batch=None,
                loss_fn=pretrain_loss, progress=False)
