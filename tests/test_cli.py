"""The CLI's contract: a user error is one line on stderr and exit code 2 (never a
traceback), --help imports no torch, output is never truncated, and `generate` serves
batches, files, JSON, n, logprobs and the chat template."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanoseek.cli import app
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def nanoseek(*args, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter (argv bytes as a shell passes them)."""
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], input=stdin, capture_output=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=120)


def assert_user_error(res, *words):
    """Exit 2, exactly one line on stderr starting `error:` and naming the problem."""
    err = res.stderr if isinstance(res.stderr, str) else res.stderr.decode()
    assert res.exit_code == 2 if hasattr(res, "exit_code") else res.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def invoke(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint (vocab 300) with a trained byte-level BPE tokenizer."""
    from nanoseek.data import load_corpus
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer
    d = tmp_path_factory.mktemp("ckpt")
    save_pretrained(CausalLM(tiny_config(vocab_size=300)), d)
    save_tokenizer(train_tokenizer(load_corpus()[:40], 300), d)
    return d


@pytest.fixture
def broken(ckpt, tmp_path):
    """A copy of the checkpoint to damage."""
    import shutil
    d = tmp_path / "broken"
    shutil.copytree(ckpt, d)
    return d


# --------------------------------------------------------------- --help
def test_help_imports_no_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom nanoseek.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0 and 'generate' in r.output\n"
            "r = CliRunner().invoke(app, ['generate', '--help'])\nassert r.exit_code == 0\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_flags_show_no_bool_type():
    for args in (["--help"], ["generate", "--help"], ["pretrain", "--help"], ["calc", "kv", "--help"]):
        r = invoke(*args, env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "--help" in r.output
        assert "<bool>" not in r.output, args


def test_python_m_nanoseek():
    r = nanoseek("calc", "params", "--preset", "tiny", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["total"] > 0


# --------------------------------------------------------- user errors
def test_generate_and_info_bad_checkpoints(broken):
    (broken / "config.json").write_text('{"vocab_size": 3,')
    for cmd in (["generate", broken, "--prompt-ids", "1"], ["info", broken]):
        assert_user_error(invoke(*cmd), "config.json", "not valid JSON")
    cfg = tiny_config(vocab_size=300).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    for cmd in (["generate", broken, "--prompt-ids", "1"], ["info", broken]):
        assert_user_error(invoke(*cmd), "unknown architecture", "LlamaForCausalLM")
    assert_user_error(invoke("info", broken / "nope"), "nope")


def test_generate_truncated_and_corrupt_safetensors(ckpt, broken):
    f = next(broken.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    assert_user_error(invoke("generate", broken, "--prompt-ids", "1"), f.name, "truncated or corrupt")
    f.write_bytes(b"garbage!" + (ckpt / f.name).read_bytes()[8:])
    assert_user_error(invoke("generate", broken, "--prompt-ids", "1"), f.name, "truncated or corrupt")


@pytest.mark.parametrize("args, words", [
    (["--device", "cuda"], ["--device"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--threads", "-1"], ["--threads"]),
    (["--temperature", "inf"], ["temperature"]),
    (["--stop-token-ids", "x"], ["--stop-token-ids"]),
    (["--max-tokens", "0"], ["--max-tokens"]),
    (["--bogus"], ["--bogus"]),
    (["--prompts-file", "/nonexistent/prompts.txt"], ["prompts.txt"]),
    (["--weight-layout", "fast"], ["--weight-layout", "fast", "k-major"]),
])
def test_generate_bad_flags(ckpt, args, words):
    if args[:2] == ["--device", "cuda"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    assert_user_error(invoke("generate", ckpt, "--prompt-ids", "1", *args), *words)


def test_generate_rejects_invalid_utf8(ckpt, tmp_path):
    assert_user_error(invoke("generate", ckpt, "-p", "a\ud800b"), "--prompt", "UTF-8", "U+D800")
    r = nanoseek("generate", str(ckpt), "-p", b"ab\xffc")  # as a shell passes invalid bytes
    assert_user_error(r, "--prompt", "UTF-8", "0xff")
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"fine\n\xfe\xff\n")
    assert_user_error(invoke("generate", ckpt, "--prompts-file", bad), "p.txt", "UTF-8")


def test_pretrain_non_utf8_data_names_the_encoding(tmp_path):
    data = tmp_path / "latin1.txt"
    data.write_bytes("caf\xe9 au lait\n\nmore text here\n".encode("latin-1"))
    r = invoke("tokenizer", "train", "--out", tmp_path / "tok", "--data", data, "--vocab-size", "300")
    assert_user_error(r, "latin1.txt", "UTF-8", "0xe9")


def test_debug_shows_the_traceback():
    r = invoke("calc", "params", "--preset", "nope")
    assert_user_error(r, "nope")
    for args, env in ((["--debug", "calc", "params", "--preset", "nope"], None),
                      (["calc", "params", "--preset", "nope"], {"NANOSEEK_DEBUG": "1"})):
        r = invoke(*args, env=env)
        assert r.exit_code != 2 and type(r.exception).__name__ == "ConfigError"


@pytest.mark.parametrize("args, words", [
    (["calc", "flops", "--preset", "tiny", "--ctx", "-1"], ["--ctx"]),
    (["plan", "capacity", "--preset", "tiny", "--qps", "nan", "--prompt-tokens", "10", "--output-tokens", "10"],
     ["qps", "nan"]),
    (["plan", "capacity", "--preset", "tiny", "--qps", "inf", "--prompt-tokens", "10", "--output-tokens", "10"],
     ["qps", "inf"]),
    (["plan", "capacity", "--preset", "tiny", "--qps", "1", "--prompt-tokens", "5000", "--output-tokens", "10"],
     ["max_position_embeddings"]),
    (["plan", "capacity", "--preset", "tiny", "--qps", "1", "--prompt-tokens", "10", "--output-tokens", "10",
      "--ttft-ms", "inf"], ["ttft_ms"]),
    (["calc", "params", "--config", "/nonexistent/config.json"], ["/nonexistent"]),
    (["pretrain", "--out", "x", "--seq-len", "0"], ["--seq-len"]),
    (["pretrain", "--out", "x", "--threads", "-1"], ["--threads"]),
    (["eval", "x", "--seq-len", "0"], ["--seq-len"]),
    (["report", "/nonexistent-run"], ["run.json"]),
])
def test_calc_and_train_bad_input(args, words):
    assert_user_error(invoke(*args), *words)


def test_library_limits():
    """The checks live in the library functions, where a Python user meets them too."""
    from nanoseek.calc.capacity import Assumptions, plan_capacity
    from nanoseek.calc.flops import flops_report
    from nanoseek.calc.gpus import get_gpu
    from nanoseek.config import ConfigError, preset
    from nanoseek.engine import SamplingParams
    cfg = preset("tiny")
    with pytest.raises(ConfigError, match="ctx"):
        flops_report(cfg, 128, 1e9, decode_ctx=-1)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        plan_capacity(cfg, get_gpu("H100"), Assumptions(qps=1, prompt_tokens=cfg.max_position_embeddings,
                                                        output_tokens=1))
    with pytest.raises(ConfigError, match="qps"):
        plan_capacity(cfg, get_gpu("H100"), Assumptions(qps=float("nan"), prompt_tokens=10, output_tokens=1))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("inf"))


def test_seq_len_beyond_context_is_rejected(tmp_path):
    from nanoseek.config import preset
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.pretrain import PretrainConfig, pretrain
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pretrain(tmp_path / "run", PretrainConfig(cfg, TrainConfig(seq_len=cfg.max_position_embeddings + 1)))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------- output
def test_piped_calc_tables_are_not_truncated():
    from nanoseek.calc.params import count_params
    from nanoseek.config import preset
    r = invoke("calc", "params", "--preset", "deepseek-v3")  # CliRunner: not a tty, 80 columns
    assert r.exit_code == 0
    assert "…" not in r.output
    assert f"{count_params(preset('deepseek-v3')).main_total:,}" in r.output
    r = nanoseek("plan", "capacity", "--preset", "deepseek-v3", "--qps", "10", "--prompt-tokens", "2000",
                 "--output-tokens", "500", env={"COLUMNS": "80"})
    assert r.returncode == 0 and "…" not in r.stdout.decode()
    # nor wrapped: each row on one line, its numbers beside its name
    r = invoke("calc", "kv", "--preset", "deepseek-v3")
    assert any("gqa-8" in line and "624.64 KB" in line for line in r.output.splitlines()), r.output


# ------------------------------------------------------------- generate
def test_generate_json_n_logprobs_in_input_order(ckpt):
    from nanoseek.engine import LLM, SamplingParams
    prompts = ["The cache", "holds latents", "x"]
    args = ["generate", ckpt, "--json", "--max-tokens", "4", "--ignore-eos", "-n", "2", "--temperature", "1",
            "--seed", "3", "--logprobs", "2"]
    r = invoke(*args, *[a for p in prompts for a in ("-p", p)])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["index"], x["sample"]) for x in recs] == [(i, k) for i in range(3) for k in range(2)]
    ref = LLM(str(ckpt)).generate(prompts, SamplingParams(n=2, temperature=1, seed=3, max_tokens=4,
                                                          ignore_eos=True, logprobs=2), use_tqdm=False)
    for x in recs:
        c = ref[x["index"]].outputs[x["sample"]]
        assert x["prompt"] == prompts[x["index"]] and x["token_ids"] == c.token_ids and x["text"] == c.text
        assert x["finish_reason"] == "length"
        assert len(x["logprobs"]) == 4 and all(2 <= len(pos) <= 3 for pos in x["logprobs"])
        assert any(d["token_id"] == c.token_ids[0] for d in x["logprobs"][0])


@pytest.mark.parametrize("layout", ["as-loaded", "k-major"])
def test_generate_weight_layout_gives_the_same_tokens(ckpt, layout):
    from nanoseek.cli.engine import WEIGHT_LAYOUTS
    from nanoseek.engine.weight_layout import LAYOUTS
    assert WEIGHT_LAYOUTS == LAYOUTS
    args = ["generate", ckpt, "--json", "--max-tokens", "6", "--ignore-eos", "-p", "The cache"]
    default, chosen = invoke(*args), invoke(*args, "--weight-layout", layout)
    assert default.exit_code == 0 and chosen.exit_code == 0, chosen.output
    assert json.loads(default.stdout)["token_ids"] == json.loads(chosen.stdout)["token_ids"]


def test_generate_prompts_file_stdin_and_text_output(ckpt, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('first prompt\n\n{"prompt": "second"}\n{"prompt_token_ids": [5, 6, 7]}\n')
    r = invoke("generate", ckpt, "--prompts-file", f, "--max-tokens", "3", "--ignore-eos", "--json")
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and [x["prompt"] for x in recs[:2]] == ["first prompt", "second"]
    assert recs[2]["prompt_token_ids"][-3:] == [5, 6, 7] and len(recs) == 3
    r = invoke("generate", ckpt, "--prompts-file", "-", "--max-tokens", "3", "--ignore-eos",
               input="alpha\nbeta\n")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.index("alpha") < out.index("beta")
    assert "[0] finish=length" in r.stderr and "[1] finish=length" in r.stderr


def test_generate_chat_template(ckpt):
    from nanoseek.text.tokenizer import load_tokenizer
    tok = load_tokenizer(ckpt)
    want = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   tokenize=False)
    r = invoke("generate", ckpt, "-p", "Hi there", "--chat", "--json", "--max-tokens", "2")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["prompt_token_ids"] == tok(want, add_special_tokens=False)["input_ids"]
    assert rec["prompt_token_ids"][0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<｜Assistant｜>") == rec["prompt_token_ids"][-1]
    assert_user_error(invoke("generate", ckpt, "--prompt-ids", "1,2", "--chat"), "--chat")


@pytest.mark.slow
def test_bench_model_json_is_json_alone():
    r = subprocess.run([sys.executable, "benchmarks/bench_model.py", "--batch", "1", "--seq", "16", "--steps", "1",
                        "--warmup", "0", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nanoseek_tok_s"] > 0
    assert "transformers [" in r.stderr


def test_finished_resume_does_not_reprint_the_old_run(tmp_path):
    from nanoseek.cli.train import _done_line, _finished_steps
    assert _finished_steps(tmp_path) is None  # no run.json: a killed or new run
    summary = {"steps": 5, "tokens_seen": 640, "tok_s": 1000.0}
    (tmp_path / "run.json").write_text(json.dumps({"summary": summary}))
    assert _finished_steps(tmp_path) == 5
    assert _done_line(tmp_path, summary, 5).startswith("nothing to do: the run")
    assert _done_line(tmp_path, {**summary, "steps": 8}, 5).startswith("done: 8 steps")


def test_local_data_files_print_no_datasets_progress(tmp_path, capfd):
    from nanoseek.data.corpus import load_file
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "one document"}\n{"text": "another"}\n')
    assert load_file(f) == ["one document", "another"]
    out, err = capfd.readouterr()
    assert "Generating" not in out + err and "examples" not in out + err


def test_parallel_axes_without_processes_are_refused(tmp_path):
    r = invoke("pretrain", "--out", str(tmp_path / "run"), "--ep", "2")
    assert r.exit_code == 2 and "--nproc" in r.output
    assert not (tmp_path / "run").exists()


def test_a_stray_rank_does_not_make_one_process_a_follower(monkeypatch):
    from nanoseek.parallel import launch
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.is_main()


def test_help_reflows_docstrings():
    """Command descriptions are reflowed, not broken at the source's line ends."""
    lines = [line for line in invoke("--help").output.splitlines() if "warm-up +" in line]
    assert lines and all("cosine/WSD" in line for line in lines), lines


# --------------------------------------------------------------- --precision, --compile
TRAINING_COMMANDS = [["pretrain", "--out", "x"], ["sft", "--model", "x", "--out", "y"],
                     ["dpo", "--model", "x", "--out", "y"], ["grpo", "--model", "x", "--out", "y"],
                     ["speedrun"], ["speedrun-rl"]]


@pytest.mark.parametrize("command", TRAINING_COMMANDS, ids=lambda c: c[0])
def test_training_commands_check_precision_and_compile(command):
    assert_user_error(invoke(*command, "--precision", "bf32"), "--precision", "bf32",
                      "auto | float32 (fp32) | bfloat16 (bf16) | float16 (fp16)")
    assert_user_error(invoke(*command, "--compile", "yes"), "--compile", "yes")


def test_cli_choices_are_the_trainers():
    """cli/common.py repeats the choices so that --help imports no torch; they must agree."""
    from nanoseek.cli.common import COMPILE_CHOICES, PRECISION_CHOICES
    from nanoseek.train.config import COMPILE_MODES, PRECISIONS
    assert PRECISION_CHOICES == PRECISIONS and COMPILE_CHOICES == COMPILE_MODES


class Called(Exception):
    """Raised by a stand-in for a stage's run function: what the command passed it."""


def _capture(monkeypatch, module: str, name: str):
    import importlib

    def stand_in(*args, **kw):
        raise Called(args, kw)
    monkeypatch.setattr(importlib.import_module(module), name, stand_in)


def _train_config(result):
    (args, _), = [result.exception.args]
    settings = next(a for a in args if hasattr(a, "train"))
    return settings.train


@pytest.mark.parametrize("command, module, name", [
    (["sft", "--model", "x", "--out", "y", "--task", "arithmetic"], "nanoseek.train.posttrain.sft", "sft"),
    (["dpo", "--model", "x", "--out", "y"], "nanoseek.train.posttrain.dpo", "dpo"),
    (["grpo", "--model", "x", "--out", "y"], "nanoseek.train.rl.run", "rl"),
], ids=["sft", "dpo", "grpo"])
def test_post_training_passes_precision_and_compile(monkeypatch, command, module, name):
    _capture(monkeypatch, module, name)
    given = _train_config(invoke(*command, "--precision", "bf16", "--compile", "on"))
    assert (given.precision, given.compile) == ("bf16", "on")
    default = _train_config(invoke(*command))
    assert (default.precision, default.compile) == ("auto", "auto")


def test_speedruns_pass_precision(monkeypatch):
    _capture(monkeypatch, "nanoseek.recipes.speedrun", "speedrun")
    r = invoke("speedrun", "--precision", "fp32", "--compile", "off")
    assert isinstance(r.exception, Called)
    assert {k: r.exception.args[1][k] for k in ("precision", "compile")} == {"precision": "fp32", "compile": "off"}
    assert "precision" not in invoke("speedrun").exception.args[1]  # not given: the speedrun's auto
    _capture(monkeypatch, "nanoseek.recipes.speedrun_rl", "speedrun_rl")
    r = invoke("speedrun-rl", "--precision", "fp32")
    assert r.exception.args[1]["precision"] == "fp32" and r.exception.args[1]["compile"] == "auto"
    assert r.exception.args[1]["optimizer"] == "adamw"
    assert invoke("speedrun-rl", "--optimizer", "muon").exception.args[1]["optimizer"] == "muon"
    assert invoke("speedrun-rl", "--optimizer", "sgd").exit_code == 2  # a clear usage error
    assert invoke("speedrun-rl", "--fp4-experts-from", "0").exception.args[1]["fp4_experts_from"] == 0
    assert invoke("speedrun-rl").exception.args[1]["fp4_experts_from"] is None
    assert invoke("speedrun-rl", "--fp4-experts-from", "-1").exit_code == 2


def test_speedrun_passes_fp4_experts_from(monkeypatch):
    _capture(monkeypatch, "nanoseek.recipes.speedrun", "speedrun")
    assert invoke("speedrun", "--fp4-experts-from", "228").exception.args[1]["fp4_experts_from"] == 228
    assert "fp4_experts_from" not in invoke("speedrun").exception.args[1]  # unset: never
    r = invoke("speedrun", "--fp4-experts-from", "-1")
    assert r.exit_code == 2 and "fp4-experts-from" in r.output
    r = invoke("speedrun", "--resume", "--fp4-experts-from", "5")  # a resumed run keeps its own
    assert "fp4_experts_from" not in r.exception.args[1] and "ignoring --fp4-experts-from" in r.output


def test_speedrun_resume_keeps_the_runs_precision(monkeypatch):
    _capture(monkeypatch, "nanoseek.recipes.speedrun", "speedrun")
    r = invoke("speedrun", "--resume", "--precision", "fp32")
    assert "precision" not in r.exception.args[1]
    assert "ignoring --precision" in r.stderr


@pytest.mark.parametrize("command, module, name", [
    (["sft", "--model", "x", "--out", "y", "--task", "arithmetic"], "nanoseek.train.posttrain.sft", "sft"),
    (["dpo", "--model", "x", "--out", "y"], "nanoseek.train.posttrain.dpo", "dpo"),
    (["grpo", "--out", "y"], "nanoseek.train.rl.run", "rl"),
], ids=["sft", "dpo", "grpo"])
def test_post_training_resume_says_it_ignores_precision(monkeypatch, command, module, name):
    _capture(monkeypatch, module, name)
    r = invoke(*command, "--resume", "--precision", "bf16", "--compile", "on")
    assert (_train_config(r).precision, _train_config(r).compile) == ("auto", "auto")
    assert "ignoring --precision, --compile" in r.stderr


def test_dpo_passes_task_options(monkeypatch):
    _capture(monkeypatch, "nanoseek.train.posttrain.dpo", "dpo")
    r = invoke("dpo", "--model", "x", "--out", "y", "--task", "arithmetic", "--pairs-from-sampling",
               "--option", "digits=2", "--option", "ops=+")
    settings = next(a for a in r.exception.args[0] if hasattr(a, "task_options"))
    assert settings.task_options == {"digits": 2, "ops": "+"}


# --------------------------------------------------------------- one vocabulary
def _commands(group=None, path=()):
    """Every leaf command of the app, with its path (`calc kv`...)."""
    import typer
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def test_every_option_of_every_command_has_help():
    missing = [f"{path} {p.name}" for path, cmd in _commands() for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert missing == []


@pytest.mark.parametrize("value, stored", [("bf16", "bf16"), ("bfloat16", "bf16"), ("FLOAT32", "fp32"),
                                           ("fp16", "fp16"), ("auto", "auto")])
def test_precision_takes_the_dtype_names_and_their_aliases(monkeypatch, value, stored):
    _capture(monkeypatch, "nanoseek.train.posttrain.sft", "sft")
    r = invoke("sft", "--model", "x", "--out", "y", "--task", "arithmetic", "--precision", value)
    assert _train_config(r).precision == stored


def test_calculators_take_the_same_dtype_names():
    r = invoke("calc", "kv", "--preset", "tiny", "--dtype", "bfloat16", "--dtype", "fp8", "--json")
    assert r.exit_code == 0, r.output
    assert {row["dtype"] for row in json.loads(r.stdout)["rows"]} == {"bf16", "fp8"}
    r = invoke("plan", "capacity", "--preset", "tiny", "--qps", "1", "--prompt-tokens", "10",
               "--output-tokens", "10", "--weight-dtype", "float16", "--kv-dtype", "fp8", "--json")
    assert (json.loads(r.stdout)["assumptions"]["weight_dtype"], json.loads(r.stdout)["assumptions"]["kv_dtype"]) \
        == ("fp16", "fp8")
    assert_user_error(invoke("calc", "kv", "--preset", "tiny", "--dtype", "int4"), "--dtype", "int4", "fp8")
    assert_user_error(invoke("convert", "a", "--out", "b", "--dtype", "fp8"), "--dtype", "float32 (fp32)")


def test_engine_dtype_words(ckpt):
    r = invoke("generate", ckpt, "--prompt-ids", "1", "--max-tokens", "1", "--json", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert_user_error(invoke("generate", ckpt, "--prompt-ids", "1", "--dtype", "fp8"), "--dtype", "fp8",
                      "auto | float32 (fp32)")
    assert_user_error(invoke("generate", ckpt, "--prompt-ids", "1", "--quantization", "int8"),
                      "--quantization", "int8", "fp8")


def test_old_spellings_still_work_with_a_note(monkeypatch):
    _capture(monkeypatch, "nanoseek.train.posttrain.sft", "sft")
    r = invoke("sft", "--init", "x", "--out", "y", "--task", "arithmetic")
    settings = next(a for a in r.exception.args[0] if hasattr(a, "init"))
    assert settings.init == "x" and "note: --init is deprecated; use --model" in r.stderr
    assert_user_error(invoke("sft", "--out", "y", "--task", "arithmetic"), "--model is required")
    _capture(monkeypatch, "nanoseek.train.rl.run", "rl")
    r = invoke("grpo", "--init", "x", "--out", "y")
    assert next(a for a in r.exception.args[0] if hasattr(a, "init")).init == "x"
    _capture(monkeypatch, "nanoseek.train.posttrain.lora", "merge_lora")
    r = invoke("merge-lora", "--base", "b", "--adapter", "a", "--out", "o")
    assert str(r.exception.args[0][0]) == "b" and "use --model" in r.stderr
    _capture(monkeypatch, "nanoseek.recipes.speedrun_rl", "speedrun_rl")
    r = invoke("speedrun-rl", "--base", "b", "--out", "runs2/x")
    assert [str(a) for a in r.exception.args[0][:3]] == ["x", "runs2", "b"]


def test_convert_reads_src_and_writes_out(monkeypatch):
    _capture(monkeypatch, "nanoseek.checkpoint.convert", "convert")
    r = invoke("convert", "src", "--out", "dst", "--quantization", "fp8", "--dtype", "float16")
    assert r.exception.args[0][:4] == ("src", "dst", "fp8", "fp16") and r.stderr == ""
    r = invoke("convert", "src", "dst", "--fp8")  # the old spelling
    assert r.exception.args[0][:3] == ("src", "dst", "fp8") and r.stderr.count("note:") == 2
    assert_user_error(invoke("convert", "src", "--quantization", "fp8"), "--out is required")


def test_eval_num_problems_and_its_old_spelling(monkeypatch):
    seen = []
    monkeypatch.setattr("nanoseek.cli.train._eval_task", lambda run_dir, task, options, n, *a: seen.append(n))
    invoke("eval", "x", "--task", "arithmetic", "--num-problems", "7")
    r = invoke("eval", "x", "--task", "arithmetic", "--n", "9")
    assert seen == [7, 9] and "--num-problems" in r.stderr


def test_torchrun_commands_share_the_parallel_flags():
    """pretrain, sft and grpo run under torchrun: the same flags with the same help."""
    flags = {}
    for path, cmd in _commands():
        if path in ("pretrain", "sft", "grpo"):
            flags[path] = {p.name: p.help for p in cmd.params if p.name in ("ep", "tp", "pp")}
            assert "nproc" in {p.name for p in cmd.params}
    assert flags["pretrain"] == flags["sft"] == flags["grpo"] and len(flags["pretrain"]) == 3
    for command in (["sft", "--model", "x", "--out", "y", "--task", "arithmetic"], ["grpo", "--model", "x", "--out", "y"]):
        assert_user_error(invoke(*command, "--tp", "2"), "--nproc")
