"""Pretraining end to end on a micro model: the run directory is a transformers
checkpoint with its tokenizer, the CLI names bad input, the report is written."""

import json

import pytest
import torch

import nanoseek
from nanoseek.train.loop import TrainConfig, read_metrics
from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain
from tests.train_utils import micro_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pipeline")
    corpus = write_corpus(tmp / "corpus.txt", n_docs=30)
    out = tmp / "run"
    pretrain(out, PretrainConfig(micro_config(), TrainConfig(max_steps=6, batch_size=4, seq_len=32, lr=1e-2,
                                                             warmup_steps=2, eval_every=3, save_every=3),
                                 DataConfig(paths=[corpus]), sample_tokens=6),
             progress=False, log=lambda *_: None, threads=1)
    return out


def test_run_dir_is_a_transformers_checkpoint(run_dir):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(run_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(run_dir)).eval()
    ours = nanoseek.from_pretrained(run_dir).eval()
    ids = torch.tensor([tok("The for statement")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert tok.eos_token_id == ours.config.eos_token_id == 1


def test_metrics_and_run_summary(run_dir):
    rec = read_metrics(run_dir)
    kinds = [r["kind"] for r in rec]
    assert kinds.count("train") == 6 and kinds.count("eval") == 2 and kinds.count("sample") == 1
    ev = [r for r in rec if r["kind"] == "eval"][-1]
    assert ev["val_loss"] > 0 and 0 < ev["val_bpb"] < 10
    run = json.loads((run_dir / "run.json").read_text())
    assert run["params"]["activated"] < run["params"]["total"]
    assert run["summary"]["steps"] == 6 and run["unigram_loss"] > 0
    train = [r for r in rec if r["kind"] == "train"]
    assert all("mfu" in r and r["mfu"] > 0 for r in train)
    assert len(train[0]["max_violation"]) == len(run["moe_layers"]) == 2


def test_report_is_written(run_dir):
    from nanoseek.reports.run_report import write_report
    path = write_report(run_dir)
    text = path.read_text()
    for needle in ("unigram baseline", "parameters, activated", "MFU", "tokens seen",
                   "expert-load max violation", "loss.png", "## Samples", "bits per byte"):
        assert needle in text, needle
    for png in ("loss.png", "expert_load.png", "lr.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_activated_params_count_only_chosen_experts():
    from nanoseek.model import CausalLM
    from nanoseek.calc.params import count_params
    from nanoseek.train.numerics.mfu import flops_per_token
    cfg = micro_config()
    m = CausalLM(cfg)
    p = count_params(m.config).summary()
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unchosen = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    # one MoE layer in the main model (the embedding table is not activated), one in MTP
    assert p["total"] - p["activated"] == unchosen + p["embedding"]
    assert p["mtp"] - p["mtp_activated"] == unchosen
    assert p["total_with_mtp"] == sum(q.numel() for q in m.parameters())
    from nanoseek.calc.flops import flops_report
    assert flops_per_token(m, 64) == flops_report(cfg, seq_len=64, include_mtp=True).train_per_token


def test_tiny_preset_counts_follow_calc():
    """The speedrun's model: the figures README's "Training" section quotes."""
    from nanoseek.cli.common import load_config
    from nanoseek.model import CausalLM
    from nanoseek.calc.params import count_params
    from nanoseek.train.numerics.mfu import flops_per_token
    m = CausalLM(load_config("tiny", None))
    p = count_params(m.config).summary()
    assert (p["total"], p["activated"], p["mtp"], p["mtp_activated"]) == (8_223_744, 3_046_400, 1_934_784, 558_528)
    assert p["total_with_mtp"] == 10_158_528
    assert flops_per_token(m, 256) == 29_122_560


def _cli(*args):
    from typer.testing import CliRunner
    from nanoseek.cli import app
    return CliRunner().invoke(app, list(map(str, args)))


def test_cli_tokenizer_train_and_bad_data(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", n_docs=10)
    r = _cli("tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--out", tmp_path / "tok")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = _cli("pretrain", "--out", tmp_path / "run", "--data", bad, "--max-steps", 1)
    assert r.exit_code == 2 and "bad.jsonl" in r.output
    r = _cli("pretrain", "--out", tmp_path / "run", "--schedule", "linear", "--max-steps", 1)
    assert r.exit_code == 2 and "schedule" in r.output


def test_cli_eval_defaults_to_the_runs_seq_len(run_dir):
    r = _cli("eval", run_dir)  # the run trained (and evaluated) at seq_len 32
    assert r.exit_code == 0, r.output
    got = float(r.output.split("val_loss=")[1].split()[0])
    last = [x for x in read_metrics(run_dir) if x["kind"] == "eval"][-1]
    assert got == pytest.approx(last["val_loss"], abs=1e-3)


def test_cli_eval_scores_the_saved_checkpoint(run_dir):
    r = _cli("eval", run_dir, "--seq-len", 32)
    assert r.exit_code == 0, r.output
    got = float(r.output.split("val_loss=")[1].split()[0])
    last = [x for x in read_metrics(run_dir) if x["kind"] == "eval"][-1]
    assert got == pytest.approx(last["val_loss"], abs=1e-3)  # the checkpoint is the trained model


def test_pretrain_reuses_the_cached_peak(tmp_path, monkeypatch):
    """The peak is measured once and cached; a run does not measure it again."""
    from nanoseek.train.numerics import mfu
    monkeypatch.setattr(mfu, "CACHE", tmp_path / "peak_flops.json")
    torch.set_num_threads(1)
    from nanoseek.train.pretrain import default_device, setup_threads
    n = torch.get_num_threads()
    setup_threads()
    key = mfu._key(default_device(), torch.bfloat16 if default_device().type == "cuda" else torch.float32)
    torch.set_num_threads(n)
    mfu.CACHE.write_text(json.dumps({key: 1.25e9}))

    def no_measure(*a, **k):
        raise AssertionError("measured the peak again")
    monkeypatch.setattr(mfu, "_measure", no_measure)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    run = pretrain(tmp_path / "run", PretrainConfig(micro_config(), TrainConfig(max_steps=1, batch_size=2, seq_len=32,
                                                                                eval_every=0, save_every=0),
                                                    DataConfig(paths=[corpus]), sample_tokens=0),
                   progress=False, log=lambda *_: None, threads=1)
    assert run["peak_flops"] == 1.25e9
