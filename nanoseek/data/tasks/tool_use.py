"""Tool-use traces: the assistant calls a `calculator` tool, reads its output, answers.

`load_task("tool_use", digits=5)` (`pad=True`: the answer at a fixed width, see
`ToolUse.answer_text`). Each example is an OpenAI-style conversation,

    user       Compute 48213 * 907. Use the calculator, then give the result in <answer></answer>.
    assistant  <think>...</think>  + tool_calls=[calculator({"expression": "48213 * 907"})]
    tool       43729191
    assistant  <answer>43729191</answer>

rendered by nanoseek's chat template with DeepSeek-V3's tool-call markers. In SFT only the
assistant's turns are targets: `chat_segments` marks the tool output untrained (the model
learns to call the tool, not to imagine its result). `rollout` runs the calculator between
turns, so evaluation scores what the model does with real tool outputs.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace

from nanoseek.text.chat_template import Part, render_chat, tool_output_parts
from nanoseek.data.tasks.arithmetic import OPS, apply, draw_problem
from nanoseek.data.tasks.base import Example, Task, TaskError, make_rewarder, no_options_left
from nanoseek.data.tasks.prompting import prompt_ids, fit_context
from nanoseek.text.special_tokens import END_THINK, EOS, THINK, TOOL_TOKENS
from nanoseek.data.tasks.rewards import (ANSWER, END_ANSWER, ExpressionError, evaluate_expression,
                                         numeric_accuracy, strip_eos, tagged)

(CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP,
 OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END) = TOOL_TOKENS
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate + - * / arithmetic exactly.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}
SYSTEM = ("You can call the tool calculator(expression), which evaluates + - * / "
          "arithmetic exactly.")
_CALL = re.compile(re.escape(CALL_BEGIN) + r"function" + re.escape(SEP)
                   + r"calculator\n```json\n(.*?)\n```" + re.escape(CALL_END), re.DOTALL)


class ToolUse(Task):
    name = "tool_use"
    system = SYSTEM
    max_rounds = 3  # model turns per conversation when evaluating

    def __init__(self, digits: int = 5, ops: str = OPS, **options):
        if not isinstance(digits, int) or not 1 <= digits <= 18:
            raise TaskError(f"task tool_use: digits={digits!r} must be an integer in [1, 18]")
        if not ops or set(ops) - set(OPS):
            raise TaskError(f"task tool_use: ops={ops!r} must be some of {OPS!r}")
        self.digits, self.ops = digits, ops
        self.pad = options.pop("pad", False)
        if not isinstance(self.pad, bool):
            raise TaskError(f"task tool_use: pad={self.pad!r} must be true or false")
        self.test_fraction = options.pop("test_fraction", self.test_fraction)
        self.max_tokens = 256  # per turn
        self.rewarder = make_rewarder(lambda ex, c: tool_accuracy(c, ex.answer), options)
        self.rewarder.format = tool_format
        no_options_left("tool_use", options)

    def draw(self, rng: random.Random) -> tuple[str, Example]:
        key, a, op, b = draw_problem(rng, self.digits, self.ops)
        return key, self.make_example(a, op, b)

    def make_example(self, a: int, op: str, b: int) -> Example:
        expression, value = f"{a} {op} {b}", str(apply(a, op, b))
        prompt = (f"Compute {expression}. Use the calculator, then give the result in "
                  f"{ANSWER}{END_ANSWER}.")
        call = {"id": "call_0", "type": "function", "function": {
            "name": "calculator", "arguments": json.dumps({"expression": expression})}}
        turns = [
            {"role": "assistant", "content": f"{THINK}\nThe calculator computes {expression} "
                                             f"exactly.\n{END_THINK}", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": value},
            {"role": "assistant", "content": f"{ANSWER}{self.answer_text(value)}{END_ANSWER}"},
        ]
        ex = Example(prompt, value, meta={"a": a, "op": op, "b": b, "turns": turns})
        head = render_chat(self.prompt_messages(ex), add_generation_prompt=True)
        ex.response = render_chat(self.prompt_messages(ex) + turns).removeprefix(head)
        return ex

    def answer_text(self, value: str) -> str:
        """The demonstration's answer: the value, or with `pad` the value written with
        leading zeros to the width of the longest result the operators give (2 x digits for
        `*`). The tool's output is then always one fixed offset back from each answer digit
        (a shorter output is one marker further, written as a 0), so a small model copies
        it with one positional attention instead of first working out how long the output
        is; numeric_accuracy reads "091234" as 91234."""
        if not self.pad:
            return value
        width = max({"+": self.digits + 1, "-": self.digits, "*": 2 * self.digits}[op] for op in self.ops)
        return value.zfill(width + value.startswith("-"))

    def messages(self, example: Example) -> list[dict]:
        return self.prompt_messages(example) + example.meta["turns"]

    def rollout(self, llm, examples: list[Example], params) -> list[list[str]]:
        """Generate; after a turn that ends in tool calls, append the calculator's outputs
        and let the model go on (up to `max_rounds` turns). Completions are the text after
        the prompt, tool outputs included, as `example.response` is."""
        params = replace(params, skip_special_tokens=False)
        convs = [_Conversation(prompt_ids(llm.tokenizer, self.prompt_messages(ex)),
                               replace(params, n=1, seed=None if params.seed is None else params.seed + k))
                 for ex in examples for k in range(params.n)]
        for round_ in range(self.max_rounds):
            for c in convs:  # a conversation that has filled the context ends here
                c.done = c.done or len(c.ids) >= llm.max_model_len
            active = [c for c in convs if not c.done]
            if not active:
                break
            outs = llm.generate([c.ids for c in active],
                                [fit_context(llm, c.ids, c.params) for c in active], use_tqdm=False)
            for conv, out in zip(active, outs):
                conv.step(out.outputs[0], llm.tokenizer, last=round_ == self.max_rounds - 1)
        return [[c.text for c in convs[i * params.n:(i + 1) * params.n]] for i in range(len(examples))]


@dataclass
class _Conversation:
    ids: list[int]
    params: object
    text: str = ""
    done: bool = False

    def step(self, completion, tokenizer, last: bool) -> None:
        self.text += completion.text
        calls = _CALL.findall(completion.text) if CALLS_END in completion.text else []
        if last or completion.finish_reason != "stop" or not calls:
            self.done = True
            return
        outputs = [part for k, args in enumerate(calls)
                   for part in tool_output_parts(run_calculator(args), first=k == 0)]
        outputs.append(Part(OUTPUTS_END, False, marker=True))
        self.text += EOS + "".join(p.text for p in outputs)
        eos = [] if _ends_in_eos(completion, tokenizer) else [Part(EOS, False, marker=True)]
        # the outputs (which may echo the model's expression) as text, only the markers special
        self.ids = self.ids + list(completion.token_ids) + tokenizer.encode_parts(eos + outputs)[0]


def _ends_in_eos(completion, tokenizer) -> bool:
    return bool(completion.token_ids) and tokenizer.decode(
        completion.token_ids[-1:], skip_special_tokens=False) == EOS


def run_calculator(arguments: str) -> str:
    """The tool: `{"expression": "..."}` -> its exact value (or an error message)."""
    try:
        expression = json.loads(arguments)["expression"]
        value, _ = evaluate_expression(str(expression), exact_division=False, allow_negation=True)
    except (ValueError, KeyError, TypeError, ExpressionError) as e:
        return f"error: {e}"
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def final_turn(completion: str) -> str:
    """The text after the last tool outputs: the answer turn."""
    return strip_eos(completion).rpartition(OUTPUTS_END)[2]


def tool_accuracy(completion: str, answer: str) -> float:
    """The answer tag must be in the final turn, and only there."""
    if completion.count(ANSWER) != 1:
        return 0.0
    return numeric_accuracy(final_turn(completion), answer)


def tool_format(completion: str) -> float:
    """<think>x</think> + well-formed calculator calls, then (after the outputs) only
    <answer>y</answer>."""
    text = strip_eos(completion)
    head, sep, rest = text.partition(CALLS_BEGIN)
    block, sep2, tail = rest.partition(CALLS_END)
    think = head.strip()
    ok = (sep and sep2 and text.count(THINK) == 1 and think.startswith(THINK)
          and think.endswith(END_THINK) and think[len(THINK):-len(END_THINK)].strip()
          and OUTPUTS_END in tail)
    if not ok:
        return 0.0
    calls = _CALL.findall(block)
    if not calls or "\n".join(CALL_BEGIN + "function" + SEP + "calculator\n```json\n" + c
                              + "\n```" + CALL_END for c in calls) != block:
        return 0.0
    if any(run_calculator(c).startswith("error") for c in calls):
        return 0.0
    return float(tagged(final_turn(completion)) is not None)  # one tag, nothing else
