"""Held-out task evaluation through the engine: a tiny random checkpoint gives accuracies in
[0, 1] under the right keys, the CLI prints them, and tool-use rollouts run the calculator
between the model's turns."""

import json
from types import SimpleNamespace

import pytest
import torch

import nanoseek
from nanoseek.cli import app
from nanoseek.data.tasks import load_task
from nanoseek.data.tasks.prompting import prompt_ids
from nanoseek.engine import LLM
from nanoseek.model import CausalLM
from nanoseek.text.special_tokens import BOS, EOS
from nanoseek.text.tokenizer import Tokenizer, save_tokenizer, train_tokenizer
from tests.train_utils import micro_config, small_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(small_corpus(60), vocab_size=384)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny")
    nanoseek.save_pretrained(CausalLM(micro_config()).eval(), out)
    save_tokenizer(tokenizer, out)
    return out


def test_prompt_has_one_bos(tokenizer):
    ids = prompt_ids(Tokenizer.of(tokenizer), [{"role": "user", "content": "Compute 1 + 2."}])
    bos = tokenizer.convert_tokens_to_ids(BOS)
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<｜Assistant｜>")


@pytest.mark.parametrize("task", ["arithmetic", "countdown", "tool_use"])
def test_evaluate_task_on_a_random_model(checkpoint, task):
    from nanoseek.train.eval import evaluate_task
    llm = LLM(checkpoint, kv_cache_memory=2**24)
    ev = evaluate_task(llm, task, n=3, k=2, samples=3, temperature=1.0, max_tokens=8)
    assert ev["n"] == 3 and ev["k"] == 2 and ev["samples_per_problem"] == 3
    for key in ("accuracy", "format", "pass@1", "pass@2"):
        assert 0.0 <= ev[key] <= 1.0, (key, ev[key])
    assert ev["pass@1"] <= ev["pass@2"]
    assert len(ev["examples"]) == 3 and all("completion" in s for s in ev["examples"])
    greedy_only = evaluate_task(llm, task, n=2, k=0, max_tokens=4)
    assert "pass@1" not in greedy_only and greedy_only["n"] == 2


def test_cli_eval_task(checkpoint):
    from typer.testing import CliRunner
    res = CliRunner().invoke(app, ["eval", str(checkpoint), "--task", "arithmetic", "--option", "digits=2",
                                   "--num-problems", "2", "--k", "2", "--max-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    assert ev["task"] == "arithmetic" and ev["n"] == 2 and "pass@2" in ev
    res = CliRunner().invoke(app, ["eval", str(checkpoint), "--task", "nosuch", "--num-problems", "2"])
    assert res.exit_code != 0 and "unknown task 'nosuch'" in res.output


class ScriptedLLM:
    """An engine stand-in that answers from a script and records its prompts."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.prompts = Tokenizer.of(tokenizer), list(replies), []
        self.max_model_len = 4096

    def generate(self, prompts, params, use_tqdm=False):
        out = []
        for ids in prompts:
            self.prompts.append(self.tokenizer.decode(ids, skip_special_tokens=False))
            text = self.replies.pop(0)
            ids = self.tokenizer.encode(text)[1:] + [1]  # [1:]: no bos; 1 = eos
            out.append(SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=ids, finish_reason="stop")]))
        return out


def test_tool_use_rollout_runs_the_calculator(tokenizer):
    from nanoseek.engine import SamplingParams
    task = load_task("tool_use", digits=3)
    ex = task.examples("test", 1)[0]
    call_turn, _, rest = ex.response.partition(EOS)
    final = rest.rpartition("<｜tool▁outputs▁end｜>")[2].removesuffix(EOS)
    llm = ScriptedLLM(tokenizer, [call_turn, final])
    [[completion]] = task.rollout(llm, [ex], SamplingParams(temperature=0))
    assert completion == ex.response.removesuffix(EOS)  # the real tool output, between the turns
    assert len(llm.prompts) == 2 and llm.prompts[1].endswith(
        f"<｜tool▁output▁begin｜>{ex.answer}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    assert task.reward(ex, completion).total == pytest.approx(1.0)
