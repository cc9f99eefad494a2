"""What a vLLM user types: `LLM.chat`, `nanoseek serve` taking `generate`'s options (and
vLLM's spellings), `nanoseek --version`, and a LoRA adapter directory met with a hint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nanoseek.cli import app
from nanoseek.engine import LLM, SamplingParams
from tests.test_server import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, kv_cache_memory="8MiB")


# ------------------------------------------------------------------- LLM.chat
def test_chat_is_generate_on_the_chat_template(llm):
    one = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <｜Assistant｜> there"}]
    two = [{"role": "user", "content": "The meaning of"}]
    outs = llm.chat([one, two], GREEDY, use_tqdm=False)
    ids = [llm.tokenizer.encode_chat(c, add_generation_prompt=True) for c in (one, two)]
    refs = llm.generate(ids, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == ids  # a marker typed in content stays text
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]
    assert [o.outputs[0].text for o in outs] == [r.outputs[0].text for r in refs]
    single = llm.chat(two, GREEDY, use_tqdm=False)  # one conversation: one output
    assert len(single) == 1 and single[0].outputs[0].token_ids == refs[1].outputs[0].token_ids


def test_max_model_len_is_the_engines(llm):
    assert llm.max_model_len == llm.engine.max_model_len == llm.engine.scheduler.max_model_len


# ---------------------------------------------------------------- the CLI face
def test_version_prints_without_importing_torch():
    code = ("import sys\nfrom nanoseek.cli import app\ntry:\n    app(['--version'])\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import nanoseek
    assert out.split() == ["nanoseek", nanoseek.__version__, "False"]


def _options(name: str) -> dict:
    import typer.main
    cmd = typer.main.get_command(app).commands[name]
    return {o: p for p in cmd.params for o in p.opts + p.secondary_opts}


def test_serve_and_chat_take_generates_engine_options():
    engine_options = {"--dtype", "--quantization", "-q", "--device", "--threads", "--kv-cache-memory",
                      "--block-size", "--speculative", "--no-speculative", "--max-num-seqs", "--max-model-len"}
    gen, serve = _options("generate"), _options("serve")
    assert engine_options <= set(gen) and engine_options <= set(serve)
    for o in engine_options:  # one definition: the same default and help
        assert (gen[o].default, gen[o].help) == (serve[o].default, serve[o].help), o
    assert {"--dtype", "--quantization", "--device", "--threads"} <= set(_options("chat"))
    assert {"--served-model-name", "--model-name", "--max-num-batched-tokens", "--enable-prefix-caching",
            "--uvicorn-log-level", "--api-key", "--host", "--port"} <= set(serve)
    assert serve["--uvicorn-log-level"].hidden


def test_serve_passes_the_options_on(ckpt, monkeypatch):
    import torch
    import uvicorn
    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.append(self.config))
    r = CliRunner().invoke(app, ["serve", str(ckpt), "--served-model-name", "my-model", "--dtype", "bfloat16",
                                 "--max-model-len", "64", "--max-num-batched-tokens", "128",
                                 "--no-enable-prefix-caching", "--kv-cache-memory", "4MiB", "--cache", "off",
                                 "--uvicorn-log-level", "warning", "--weight-layout", "as-loaded"])
    assert r.exit_code == 0, r.output
    (config,) = seen
    engine = config.app.state.llm.engine
    assert config.app.state.model_name == "my-model" and config.log_level == "warning"
    assert engine.max_model_len == 64 and engine.config.max_num_batched_tokens == 128
    assert not engine.config.enable_prefix_caching
    assert engine.config.weight_layout == engine.weight_layout == "as-loaded"
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    bad = CliRunner().invoke(app, ["serve", str(ckpt), "--dtype", "float8", "--cache", "off"])
    assert bad.exit_code == 2 and "float8" in bad.output
    bad = CliRunner().invoke(app, ["serve", str(ckpt), "--weight-layout", "fast", "--cache", "off"])
    assert bad.exit_code == 2 and "fast" in bad.output


# ----------------------------------------------------------- a LoRA adapter
@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["serve", "--cache", "off"], ["chat"]])
def test_an_unmerged_lora_directory_says_to_merge_it(tmp_path, command):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None, "r": 8}))
    (run / "run.json").write_text(json.dumps({"stage": "sft", "settings": {"init": "runs/base"}}))
    for where, base in ((run, "runs/base"), (run / "adapter", "BASE_CHECKPOINT")):
        r = CliRunner().invoke(app, [command[0], str(where), *command[1:]], input="")
        assert r.exit_code == 2, r.output
        (line,) = r.output.strip().splitlines()
        assert "unmerged LoRA adapter" in line
        assert f"nanoseek merge-lora --base {base} --adapter {run / 'adapter'}" in line
