"""The agent's loop against a mock OpenAI-compatible endpoint (tests/agent_mock.py): native
tool calls, the text fallback, DeepSeek markers in the content, the trajectory JSONL, the
guards, the token budget, image parts and the CLI."""

import json

from nanoseek.agent import Agent, ContextBudget, Guards
from nanoseek.text.chat_template import render_chat
from tests.agent_mock import mock_endpoint, native_model, repeating_model, text_model


def test_native_tools_answer_and_trajectory(tmp_path):
    path = tmp_path / "traj.jsonl"
    printed = []
    with mock_endpoint(native_model) as (url, requests):
        traj = Agent(url, "mock", trajectory_path=path, echo=printed.append).run("What is 123 * 456?")
    assert traj.answer == "The product is 56088."
    assert traj.stop_reason == "answered" and traj.steps == 2
    assert requests[0]["tools"][0]["function"]["name"] == "calculator"
    tool_msgs = [m for m in requests[1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["call_0", "call_1"]
    assert tool_msgs[1]["content"].startswith("error: calculator: division by zero")  # an error is an observation
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["type"] for e in events] == ["task", "thought", "call", "observation", "call",
                                          "observation", "answer", "stop"]
    assert events[3]["content"] == "56088" and events[3]["ok"] and not events[5]["ok"]
    assert any(p.startswith("[1] call: calculator(") for p in printed)


def test_text_fallback_when_tools_are_rejected(tmp_path):
    with mock_endpoint(text_model) as (url, requests):
        traj = Agent(url, "mock", echo=None).run("What is 123 * 456?")
    assert traj.answer == "The product is 56088."
    assert "tools" in requests[0] and all("tools" not in r for r in requests[1:])
    assert "tool_call" in requests[1]["messages"][0]["content"]  # the protocol is in the system prompt
    assert any("switching to the text protocol" in e["content"] for e in traj.of_type("note"))
    assert traj.of_type("observation")[0]["content"] == "56088"


def test_text_mode_never_sends_tools():
    with mock_endpoint(text_model) as (url, requests):
        traj = Agent(url, "mock", mode="text", echo=None).run("What is 123 * 456?")
    assert traj.answer == "The product is 56088." and len(requests) == 2
    assert all("tools" not in r for r in requests)


def test_deepseek_markers_in_content_are_calls():
    """A server that returns text with special tokens kept: the markers are parsed."""
    marked = render_chat([{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "7*6"}}}]}])

    def model(body):
        if body["messages"][-1]["role"] == "tool":
            return {"content": "42 it is."}
        return {"content": marked}
    with mock_endpoint(model) as (url, requests):
        traj = Agent(url, "mock", echo=None).run("7*6?")
    assert traj.of_type("call")[0]["name"] == "calculator"
    assert requests[1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_0", "content": "42"}
    assert traj.answer == "42 it is."


def test_repeated_calls_are_refused_and_steps_bounded():
    with mock_endpoint(repeating_model) as (url, requests):
        traj = Agent(url, "mock", guards=Guards(max_steps=4), echo=None).run("2+2?")
    assert traj.answer is None and traj.stop_reason == "maximum steps reached (4)"
    assert len(requests) == 4
    obs = [e["content"] for e in traj.of_type("observation")]
    assert obs[0] == "4" and all(o.startswith("error: repeated call") for o in obs[1:])
    assert "returned:\n4" in obs[1]


def test_unknown_tool_and_bad_arguments_are_observations():
    script = iter([{"content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "nope", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "calculator", "arguments": "{oops"}},
        {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
        {"content": "done"}])
    with mock_endpoint(lambda body: next(script)) as (url, requests):
        traj = Agent(url, "mock", echo=None).run("x")
    obs = [e["content"] for e in traj.of_type("observation")]
    assert obs[0].startswith("error: no tool named 'nope'")
    assert obs[1].startswith("error: the arguments of calculator are not JSON")
    assert obs[2].startswith("error: calculator:") and "expression" in obs[2]
    assert traj.answer == "done"


def test_endpoint_failure_ends_the_run_cleanly(tmp_path):
    with mock_endpoint(lambda body: (500, "boom")) as (url, _):
        traj = Agent(url, "mock", echo=None, trajectory_path=tmp_path / "t.jsonl").run("x")
    assert traj.answer is None and traj.stop_reason.startswith("endpoint error: InternalServerError")
    assert json.loads((tmp_path / "t.jsonl").read_text().splitlines()[-1])["type"] == "stop"


def test_image_parts_pass_through_unchanged():
    task = [{"type": "text", "text": "What is in the picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    with mock_endpoint(lambda body: {"content": "a cat"}) as (url, requests):
        traj = Agent(url, "mock", echo=None).run(task)
    assert requests[0]["messages"][1] == {"role": "user", "content": task}
    assert traj.answer == "a cat"


def test_budget_shortens_old_observations():
    big = "x" * 4000
    script = iter([{"content": "", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": "echo", "arguments": json.dumps({"i": i})}}]}
        for i in range(3)] + [{"content": "done"}])
    from nanoseek.agent.tools.base import Tool
    echo = Tool("echo", "big output", {"type": "object", "properties": {"i": {"type": "integer"}}},
                lambda i: big)
    with mock_endpoint(lambda body: next(script)) as (url, requests):
        traj = Agent(url, "mock", tools=[echo], budget=ContextBudget(1500), echo=None).run("go")
    last = [m["content"] for m in requests[-1]["messages"] if m["role"] == "tool"]
    assert "shortened to fit the token budget" in last[0] and last[-1] == big  # oldest cut, newest whole
    assert any("shortened" in e["content"] for e in traj.of_type("note"))


def test_total_timeout_stops_before_the_next_step():
    g = Guards(total_timeout_s=0.0)
    with mock_endpoint(native_model) as (url, requests):
        traj = Agent(url, "mock", guards=g, echo=None).run("x")
    assert traj.stop_reason.startswith("total timeout") and requests == []


def test_cli_agent_session(tmp_path):
    from typer.testing import CliRunner
    from nanoseek.cli import app
    path = tmp_path / "t.jsonl"
    with mock_endpoint(native_model) as (url, _):
        res = CliRunner().invoke(app, ["agent", "--base-url", url, "--model", "mock",
                                       "--trajectory", str(path), "What is 123 * 456?"])
    assert res.exit_code == 0, res.output
    assert "call: calculator(" in res.output and "The product is 56088." in res.output
    assert json.loads(path.read_text().splitlines()[-2])["content"] == "The product is 56088."


def test_cli_agent_rejects_bad_mode():
    from typer.testing import CliRunner
    from nanoseek.cli import app
    res = CliRunner().invoke(app, ["agent", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                   "--mode", "telepathy", "x"])
    assert res.exit_code == 2


def test_extra_body_is_sent_with_every_request():
    with mock_endpoint(native_model) as (url, requests):
        Agent(url, "mock", echo=None, extra_body={"skip_special_tokens": False}).run("What is 123 * 456?")
    assert len(requests) == 2 and all(r["skip_special_tokens"] is False for r in requests)
