"""What every post-training task is: examples drawn from a seed, split train / test by a
hash of the problem, chat messages for SFT and generation, and a rule-based reward.

The split is decided by the problem itself (a hash of its canonical form), never by the
order it was drawn in, so no test problem is ever a training problem, whatever `n` and
`seed` each side asks for. A commutative problem is hashed in one canonical form (3+5 and
5+3 fall on the same side).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from nanoseek.data.tasks.rewards import Reward, Rewarder

SPLITS = ("train", "test")
FORMAT_HINT = "Reason in <think></think>, then give the {what} in <answer></answer>."


class TaskError(ValueError):
    """A task that cannot be built or asked for (bad option, split, file row)."""


@dataclass
class Example:
    prompt: str                     # the user's message
    answer: str                     # the reference answer (what the <answer> tag must hold)
    response: str | None = None     # an SFT demonstration: <think>...</think><answer>...</answer>
    meta: dict = field(default_factory=dict)  # task data the reward needs (numbers, target...)


def split_of(key: str, test_fraction: float) -> str:
    """'test' for a fixed share of problems, chosen by a hash of the problem's key."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return "test" if h < test_fraction * 2**64 else "train"


def seeded_rng(*parts) -> random.Random:
    """A generator that depends on `parts` only (not on PYTHONHASHSEED or the platform)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def check_split(split: str, n: int | None, name: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"task {name}: split {split!r} is not one of {SPLITS}")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise TaskError(f"task {name}: n={n!r} must be a non-negative integer")


class Task:
    """The interface SFT, DPO, GRPO and `nanoseek eval --task` use. Generated tasks define
    `draw(rng) -> (key, Example)`; file tasks override `examples`."""

    name = "task"
    system: str | None = None  # an optional system prompt
    test_fraction = 0.1
    max_tokens = 256           # generation budget when evaluating
    rewarder: Rewarder

    def draw(self, rng: random.Random) -> tuple[str, Example]:
        raise NotImplementedError

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` problems of `split`, the same for the same seed."""
        check_split(split, n, self.name)
        rng, out, draws = seeded_rng(self.name, split, seed), [], 0
        while len(out) < n:
            key, ex = self.draw(rng)
            draws += 1
            if split_of(f"{self.name}|{key}", self.test_fraction) == split:
                out.append(ex)
            elif draws > 1000 + 100 * n:
                raise TaskError(f"task {self.name}: only {len(out)} {split} problems in {draws} "
                                "draws; the problem space is too small (raise digits or numbers)")
        return out

    def prompt_messages(self, example: Example) -> list[dict]:
        """The conversation up to the answer (what the model is prompted with)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": example.prompt}]

    def messages(self, example: Example) -> list[dict]:
        """The conversation with the demonstration, for SFT."""
        if example.response is None:
            raise TaskError(f"task {self.name}: example {example.prompt!r} has no response to train on")
        return self.prompt_messages(example) + [{"role": "assistant", "content": example.response}]

    def reward(self, example: Example, completion: str, length: int | None = None) -> Reward:
        """Score a completion (the assistant's text, special tokens kept)."""
        return self.rewarder(example, completion, length)

    def rollout(self, llm, examples: list[Example], params) -> list[list[str]]:
        """Completions (params.n per example) from an engine `LLM`, prompted through the
        chat template. Tasks with tools override this to run them between turns."""
        from nanoseek.data.tasks.prompting import generate_texts
        prompts = [self.prompt_messages(ex) for ex in examples]
        return generate_texts(llm, prompts, params)


def make_rewarder(accuracy, options: dict) -> Rewarder:
    """The task's Rewarder, with the reward options a user passed to load_task."""
    known = ("accuracy_weight", "format_weight", "max_length", "cache_length", "overlong_weight")
    return Rewarder(accuracy, **{k: options.pop(k) for k in known if k in options})


def no_options_left(name: str, options: dict) -> None:
    if options:
        raise TaskError(f"task {name}: unknown option(s) {sorted(options)}")
