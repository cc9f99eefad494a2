"""Verifiable tasks: seeded, split by problem, demonstrations that earn full reward, user
JSONL files with errors that name the line, and tool-use traces whose tool outputs are never
training targets."""

import json

import pytest

from nanoseek.text.chat_template import chat_segments
from nanoseek.data.tasks import TASKS, TaskError, load_task
from nanoseek.data.tasks.tool_use import run_calculator
from nanoseek.text.special_tokens import TOOL_TOKENS

BUILTIN = [("arithmetic", {"digits": 3}), ("arithmetic", {"digits": 1}), ("countdown", {}),
           ("tool_use", {})]


@pytest.mark.parametrize("name,options", BUILTIN)
def test_same_seed_same_examples_other_seed_others(name, options):
    task = load_task(name, **options)
    a, b = task.examples("train", 50, seed=3), load_task(name, **options).examples("train", 50, seed=3)
    assert [(e.prompt, e.answer, e.response) for e in a] == [(e.prompt, e.answer, e.response) for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in task.examples("train", 50, seed=4)]
    assert len(a) == 50


@pytest.mark.parametrize("name,options", BUILTIN)
def test_train_and_test_never_share_a_problem(name, options):
    task = load_task(name, **options)
    key = _key(name)
    train = {key(e) for seed in (0, 1) for e in task.examples("train", 3000, seed)}
    test = {key(e) for seed in (0, 1) for e in task.examples("test", 300, seed)}
    assert train and test and not train & test


def _key(name):
    """The problem as a set: 3+5 and 5+3 are one problem."""
    if name == "countdown":
        return lambda e: (tuple(sorted(e.meta["numbers"])), e.meta["target"])
    return lambda e: (frozenset((e.meta["a"], e.meta["b"])) if e.meta["op"] in "+*"
                      else (e.meta["a"], e.meta["b"]), e.meta["op"])


@pytest.mark.parametrize("name,options", BUILTIN)
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_demonstration_earns_full_reward(name, options, split):
    task = load_task(name, **options)
    for ex in task.examples(split, 200, seed=0):
        r = task.reward(ex, ex.response)
        assert r.correct and r.total == pytest.approx(1.0), (ex.prompt, ex.response, r)


def test_arithmetic_demonstrations_work_digit_by_digit():
    from nanoseek.data.tasks.arithmetic import make_example
    think = lambda ex: ex.response.split("</think>")[0].removeprefix("<think>\n").strip().split("\n")  # noqa: E731
    assert think(make_example(478, "+", 356)) == ["8+6=14, carry 1", "7+5+1=13, carry 1", "4+3+1=8"]
    assert think(make_example(702, "-", 315)) == ["2-5=-3, +10=7, borrow 1", "0-1-1=-2, +10=8, borrow 1",
                                                 "7-3-1=3"]
    assert think(make_example(12, "-", 45))[0] == "12<45, so the result is -(45-12)"
    assert make_example(12, "-", 45).answer == "-33"
    assert think(make_example(478, "*", 36)) == ["478*6=2868", "478*30=14340", "2868+14340=17208"]
    task = load_task("arithmetic", digits=3, ops="+")
    ex = task.examples("train", 1)[0]
    assert ex.answer == str(ex.meta["a"] + ex.meta["b"])
    assert "<think>" in task.prompt_messages(ex)[-1]["content"]
    msgs = task.messages(ex)
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[-1]["content"] == ex.response


def test_countdown_uses_the_given_numbers():
    task = load_task("countdown", count=3, max_number=20)
    for ex in task.examples("train", 50):
        assert len(ex.meta["numbers"]) == 3 and max(ex.meta["numbers"]) <= 20
        assert f"make {ex.meta['target']}" in ex.prompt


def test_bad_options_and_splits_are_named():
    with pytest.raises(TaskError, match="digits"):
        load_task("arithmetic", digits=0)
    with pytest.raises(TaskError, match="ops"):
        load_task("arithmetic", ops="^")
    with pytest.raises(TaskError, match="unknown option.*colour"):
        load_task("countdown", colour="red")
    with pytest.raises(TaskError, match="split 'val'"):
        load_task("arithmetic").examples("val", 3)
    with pytest.raises(TaskError, match="unknown task 'sorting'"):
        load_task("sorting")
    assert set(TASKS) == {"arithmetic", "countdown", "tool_use", "rendered_arithmetic"}


# ----------------------------------------------------------------------------- tool use
def test_tool_outputs_are_never_training_targets():
    task = load_task("tool_use", digits=4)
    ex = task.examples("train", 1)[0]
    msgs = task.messages(ex)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_calls"][0]["function"]["name"] == "calculator"
    segments = chat_segments(msgs)
    trained = "".join(t for t, on in segments if on)
    untrained = "".join(t for t, on in segments if not on)
    output = TOOL_TOKENS[7] + ex.answer + TOOL_TOKENS[8]  # <｜tool▁output▁begin｜>VALUE<｜tool▁output▁end｜>
    assert output in untrained and TOOL_TOKENS[7] not in trained
    assert TOOL_TOKENS[0] in trained and f"<answer>{ex.answer}</answer>" in trained
    assert "".join(t for t, _ in segments).endswith(ex.response)


def test_calculator_is_exact_and_refuses_code():
    assert run_calculator(json.dumps({"expression": "48213 * 907"})) == str(48213 * 907)
    assert run_calculator(json.dumps({"expression": "7 / 2"})) == "7/2"
    assert run_calculator(json.dumps({"expression": "-3 - 4"})) == "-7"
    assert run_calculator(json.dumps({"expression": "__import__('os')"})).startswith("error")
    assert run_calculator("not json").startswith("error")


def test_tool_use_reward_needs_the_call_and_the_answer_after_it():
    task = load_task("tool_use", digits=3)
    ex = task.examples("test", 1)[0]
    good = ex.response
    no_call = f"<think>\nx\n</think>\n<answer>{ex.answer}</answer>"
    assert task.reward(ex, no_call).components["format"] == 0.0
    assert task.reward(ex, no_call).correct  # the right number still counts as accurate
    early = good.replace(f"<answer>{ex.answer}</answer>", "").replace(
        "</think>", f"</think><answer>{ex.answer}</answer>")
    assert not task.reward(ex, early).correct  # an answer before the tool ran is not the final turn
    broken = good.replace('"expression"', '"expr"')
    assert task.reward(ex, broken).components["format"] == 0.0


def test_tool_use_pad_writes_the_answer_at_a_fixed_width():
    plain, padded = load_task("tool_use", digits=3, ops="*"), load_task("tool_use", digits=3, ops="*", pad=True)
    ex = padded.make_example(123, "*", 456)  # 56088: five digits, the width is six
    assert padded.messages(ex)[-1]["content"] == "<answer>056088</answer>"
    assert plain.messages(plain.make_example(123, "*", 456))[-1]["content"] == "<answer>56088</answer>"
    assert ex.prompt == plain.make_example(123, "*", 456).prompt and ex.answer == "56088"
    assert padded.reward(ex, ex.response).correct and padded.reward(ex, ex.response).components["format"] == 1.0
    assert padded.messages(padded.make_example(999, "*", 999))[-1]["content"] == "<answer>998001</answer>"
    minus = load_task("tool_use", digits=2, ops="-", pad=True).make_example(10, "-", 15)
    assert minus.meta["turns"][-1]["content"] == "<answer>-05</answer>"
    with pytest.raises(TaskError, match="pad"):
        load_task("tool_use", pad="yes")


# ----------------------------------------------------------------------------- JSONL
def _write(tmp_path, rows):
    path = tmp_path / "quiz.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_task_splits_and_scores(tmp_path):
    rows = [{"prompt": f"What is {i} halves?", "answer": f"{i}/2"} for i in range(40)]
    rows += [{"prompt": "Capital of France?", "answer": "Paris", "split": "test",
              "response": "<think>\nIt is Paris.\n</think>\n<answer>Paris</answer>"}]
    task = load_task(str(_write(tmp_path, rows)))
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 41 and not {e.prompt for e in train} & {e.prompt for e in test}
    assert task.examples("train", 5, seed=1) == task.examples("train", 5, seed=1)
    paris = next(e for e in test if e.answer == "Paris")
    assert task.reward(paris, paris.response).total == pytest.approx(1.0)
    assert task.reward(paris, "<think>\nhm\n</think>\n<answer> paris </answer>").correct
    half = next(e for e in train + test if e.answer == "1/2")
    assert task.reward(half, "<think>\nx\n</think>\n<answer>0.5</answer>").correct


@pytest.mark.parametrize("bad,message", [
    ("{not json", "quiz.jsonl:2: not valid JSON"),
    ({"answer": "1"}, "quiz.jsonl:2: missing 'prompt'"),
    ({"prompt": "2+2?"}, "quiz.jsonl:2: missing 'answer'"),
    ({"prompt": "", "answer": "1"}, "quiz.jsonl:2: 'prompt' must be"),
    ({"prompt": "x", "answer": ["1"]}, "quiz.jsonl:2: 'answer' must be"),
    ({"prompt": "x", "answer": "1", "split": "dev"}, "quiz.jsonl:2: 'split' is 'dev'"),
    ([1, 2], "quiz.jsonl:2: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad, message):
    path = _write(tmp_path, [{"prompt": "1+1?", "answer": 2}, bad])
    with pytest.raises(TaskError, match=message.replace("+", r"\+")):
        load_task(str(path))


def test_jsonl_missing_empty_and_one_sided_files(tmp_path):
    with pytest.raises(TaskError, match="no such task file"):
        load_task(str(tmp_path / "none.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="empty task file"):
        load_task(str(tmp_path / "empty.jsonl"))
    task = load_task(str(_write(tmp_path, [{"prompt": "a", "answer": "1", "split": "train"}])))
    with pytest.raises(TaskError, match="no test rows"):
        task.examples("test")


def test_jsonl_with_a_user_reward_function(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def long_enough(example, completion):\n    return len(completion) >= int(example.answer)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write(tmp_path, [{"prompt": "Write 10 characters.", "answer": "10", "split": "test"}])
    task = load_task(str(path), reward="my_reward:long_enough", format_weight=0.0, accuracy_weight=1.0)
    ex = task.examples("test")[0]
    assert task.reward(ex, "x" * 12).correct and task.reward(ex, "x" * 12).total == 1.0
    assert not task.reward(ex, "x" * 3).correct
    with pytest.raises(ValueError, match="cannot load nope"):
        load_task(str(path), reward="my_reward:nope")
