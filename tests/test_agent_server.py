"""The agent against nanoseek's own server, end to end: a tiny model trained in the test on
one tool-call conversation (so that greedy decoding writes DeepSeek-V3's call markers), served
by `nanoseek serve`'s app; the openai client sees `tool_calls`, and `Agent` calls the
calculator through the native tools path and answers from its output."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.text.chat_template import render_chat
from tests.conftest import tiny_config
from tests.test_server import Live, make_app

pytestmark = pytest.mark.usefixtures("one_thread")
SYSTEM = "You can call calculator(expression)."
TASK = "What is 123 * 456?"
ARGS = '{"expression": "123 * 456"}'
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": TASK},
    {"role": "assistant", "content": "Let me compute.", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": ARGS}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "56088"},
    {"role": "assistant", "content": "The product is 56088."},
]
CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}


def memorize(model, ids: list[int], steps: int = 300) -> float:
    """Fit the model to one token sequence (every next token a target); returns the last loss."""
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model.loss(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    return loss.item()


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """A checkpoint that, greedily, calls calculator(123 * 456) and then reports its output."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.data import load_corpus
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import Tokenizer, save_tokenizer, train_tokenizer
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("caller")
    tok = train_tokenizer(load_corpus()[:40], 300)
    model = CausalLM(tiny_config(vocab_size=300, num_nextn_predict_layers=0))
    ids = Tokenizer.of(tok).encode(render_chat(CONVERSATION), add_special_tokens=False)
    assert memorize(model, ids) < 0.05
    save_pretrained(model.eval(), d)
    save_tokenizer(tok, d)
    server = Live(make_app(d))
    yield server
    server.stop()


def test_openai_client_gets_tool_calls(caller):
    client = caller.client()
    kw = dict(model="tiny", messages=CONVERSATION[:2], tools=[CALC], temperature=0, max_tokens=150)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "123 * 456"}
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me compute."
    (streamed,) = [t for d in deltas for t in (d.tool_calls or [])]
    assert streamed.function.name == "calculator" and streamed.function.arguments == ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(**{**kw, "tools": None})  # no tools: no parsing, as before
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"
    none = client.chat.completions.create(**kw, tool_choice="none")
    assert none.choices[0].message.content == "Let me compute." and none.choices[0].message.tool_calls is None


def test_agent_loop_against_the_server(caller, tmp_path):
    from nanoseek.agent import Agent
    path = tmp_path / "trajectory.jsonl"
    agent = Agent(caller.url + "/v1", "tiny", system=SYSTEM, mode="native", trajectory_path=path,
                  echo=None)
    traj = agent.run(TASK)
    assert traj.stop_reason == "answered" and traj.steps == 2
    assert traj.answer == "The product is 56088."
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["type"] for e in events] == ["task", "thought", "call", "observation", "answer", "stop"]
    call, obs = events[2], events[3]
    assert call["name"] == "calculator" and json.loads(call["arguments"]) == {"expression": "123 * 456"}
    assert obs["content"] == "56088" and obs["ok"]
    assert [m["role"] for m in traj.messages] == ["system", "user", "assistant", "tool", "assistant"]
