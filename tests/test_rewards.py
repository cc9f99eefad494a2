"""Rule-based rewards on hand-made completions: right, wrong, malformed, over-long,
equivalent forms, and the countdown rules (no number twice, none not given, exact division)."""

import itertools
import math

import pytest

from nanoseek.data.tasks import load_task
from nanoseek.data.tasks.arithmetic import make_example
from nanoseek.train.eval import pass_at_k
from nanoseek.text.special_tokens import EOS
from nanoseek.data.tasks.rewards import (ExpressionError, Rewarder, answer_of, check_equation,
                                         evaluate_expression, format_reward, numeric_accuracy,
                                         overlong_penalty, text_accuracy)


def r1(think, answer):
    return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"


TASK = load_task("arithmetic", digits=3)
EX = make_example(478, "+", 356)  # 834


@pytest.mark.parametrize("completion,total,correct", [
    (r1("8+6=14", "834"), 1.0, True),
    (r1("8+6=14", "834") + "<｜end▁of▁sentence｜>", 1.0, True),
    (r1("8+6=14", "835"), 0.1, False),                          # wrong, well formed
    ("<answer>834</answer>", 0.9, True),                       # right, no think
    (r1("", "834"), 0.9, True),                                 # empty think: no format
    (r1("x", "834") + "<answer>834</answer>", 0.0, False),      # two answer tags
    (r1("x", "834") + " and more", 0.0, False),                 # text after the answer voids it
    ("<think>\nx\n</think>\nThe answer is 834.", 0.1 * 0, False),  # not in the tag
    (r1("the answer is 834", "I don't know"), 0.1, False),      # the number only in think
    (r1("x", "478+356"), 0.1, False),                           # an expression, not a number
    (r1("x", "834.0"), 1.0, True),
    ("<think>x</think><think>y</think><answer>834</answer>", 0.9, True),  # two thinks
    ("", 0.0, False),
])
def test_hand_made_arithmetic_completions(completion, total, correct):
    r = TASK.reward(EX, completion)
    assert r.total == pytest.approx(total) and r.correct is correct, r


@pytest.mark.parametrize("given,expected,ok", [
    ("0.5", "1/2", True), ("1/2", "0.5", True), ("\\frac{1}{2}", "0.5", True),
    ("2/4", "0.5", True), ("1,234", "1234", True), ("-7", "-7", True), ("7", "-7", False),
    ("0.49", "0.5", False),
])
def test_numbers_in_equivalent_forms(given, expected, ok):
    assert numeric_accuracy(r1("x", given), expected) == float(ok)


def test_format_wants_each_tag_once_and_nothing_after():
    assert format_reward(r1("a", "1")) == 1.0
    assert format_reward("  " + r1("a", "1") + "\n") == 1.0
    assert format_reward(r1("a", "1") + "!") == 0.0
    assert format_reward(r1("a <think> b", "1")) == 0.0
    assert format_reward(r1("a", " ")) == 0.0
    assert format_reward("<answer>1</answer><think>a</think>") == 0.0
    assert answer_of("<answer>1</answer><answer>2</answer>") is None
    assert answer_of("</answer>1<answer>") is None


def test_overlong_penalty_is_soft_then_full():
    assert overlong_penalty(700, 1024, 256) == 0.0
    assert overlong_penalty(768, 1024, 256) == 0.0
    assert overlong_penalty(896, 1024, 256) == pytest.approx(0.5)
    assert overlong_penalty(1024, 1024, 256) == pytest.approx(1.0)
    assert overlong_penalty(5000, 1024, 256) == 1.0
    assert overlong_penalty(5000, None, 256) == 0.0
    rewarder = Rewarder(lambda ex, c: 1.0, max_length=100, cache_length=50)
    long = r1("x" * 200, "834")
    r = rewarder(EX, long)
    assert r.correct and r.components["overlong"] == -1.0 and r.total == pytest.approx(0.0)
    assert rewarder(EX, long, length=60).total == pytest.approx(1.0 - 0.2)  # caller's token count


@pytest.mark.parametrize("expression,why", [
    ("(25 - 5) * 4 + 3", None),
    ("3 + 4 * (25 - 5)", None),
    ("25 * 4 - 5 - 3 - 9", "not one of"),               # 9 not given
    ("(25 - 5) * 4 + 3 + 3", "more often than given"),   # 3 twice
    ("25 * 4 / 3 - 5", "not exact"),
    ("(25 + 5) * 4 / 0", "division by zero"),
    ("25 + 5 + 4 + 3", "evaluates to 37, not 83"),
    ("-5 + 25 * 4 - 3", "only integers"),               # negation is not a given number
    ("__import__('os').system('x')", "only integers"),
    ("25 ** 4", "only integers"),
    ("(25 - 5) × 4 + 3", None),
    ("83", "not one of"),
    ("2.5 * 4", "only integers"),
    ("(((", "not an arithmetic expression"),
])
def test_countdown_equations(expression, why):
    got = check_equation(expression, [25, 5, 4, 3], 83)
    assert (got is None) if why is None else (got is not None and why in got), got


def test_countdown_reward_reads_only_the_tag():
    task = load_task("countdown")
    ex = task.examples("test", 1)[0]
    assert task.reward(ex, ex.response).correct
    wrong = ex.response.replace(f"<answer>{ex.answer}</answer>", "<answer>1 + 1</answer>")
    assert not task.reward(ex, wrong).correct
    outside = ex.response.replace(f"<answer>{ex.answer}</answer>", ex.answer)
    assert not task.reward(ex, outside).correct


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 8) for c in range(n + 1)
                                   for k in range(1, n + 1)])
def test_pass_at_k_matches_brute_force(n, c, k):
    """The estimator against its definition: over all k-subsets of the n samples, the share
    holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_checks_its_arguments():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_integer_fast_path_agrees_with_math_verify():
    """Integers on both sides skip math-verify's sympy parse; the verdict must not change."""
    from math_verify import parse, verify
    from nanoseek.data.tasks.rewards import math_equal
    pairs = [("7", "7"), ("007", "7"), ("+7", "7"), ("-0", "0"), ("12", "13"), ("-7", "7"),
             ("123456789", "123456789"), ("99", "-99")]
    for given, expected in pairs:
        assert math_equal(given, expected) == bool(verify(parse(expected), parse(given))), (given, expected)


# ----------------------------------------------------------------------------- reward hacks
@pytest.mark.parametrize("completion,total", [
    ("<think>\nthe sum is <answer>834</answer>\n</think>", 0.0),       # answer only in think
    ("<think>\n<answer>834</answer>\n</think>\nI am not sure.", 0.0),
    ("<think>\n<answer>834</answer>\n</think>\n<answer>?</answer>", 0.0),
    ("<think>\nx <answer>834</answer>", 0.0),                           # think never closed
    (r1("x", "834") + "\nActually 43.", 0.0),                           # a trailing correction
    (r1("x", "834") + EOS + "Actually 43.", 0.0),                       # ... after an eos
    (r1("x", "834") + "\n<answer>43</answer>", 0.0),                    # two answer tags
    (r1("x", "43") + "\n<answer>834</answer>", 0.0),
    ("<think>\nx\n</think>\n<answer><answer>834</answer></answer>", 0.0),  # nested
    ("<think>\nx\n</think>\n<answer>834</answer>\n</answer>", 0.0),     # a stray end tag
    ("<think>\nx\n</think>\n<answer><think>834</answer>", 0.0),
    ("<think>\nx\n</think>\nSo: <answer>834</answer>", 0.0),            # prose before the tag
    (r1("x", "1668/2"), 0.1),                                           # expressions, not numbers
    (r1("x", "\\frac{1668}{2}"), 0.1),
    (r1("x", "834/1"), 0.1),
    (r1("x", "$1668/2$"), 0.1),
    (r1("x", "800+34"), 0.1),
    (r1("x", "2*417"), 0.1),
    (r1("x", "\\boxed{800+34}"), 0.1),
    (r1("x", "--834"), 0.1),
    (r1("x", "834 or 835"), 0.1),
    (r1("x", "834 apples"), 0.1),
    (r1("x", "8" * 300), 0.1),
])
def test_reward_hacks_earn_no_accuracy(completion, total):
    """Only the one answer tag after the reasoning counts, nothing may follow it, and the
    arithmetic task's result is a number (84/2 is a division left undone)."""
    r = TASK.reward(EX, completion)
    assert r.components["accuracy"] == 0.0 and not r.correct, r
    assert r.total == pytest.approx(total), r


@pytest.mark.parametrize("given,expected", [
    ("\\boxed{834}", "834"), ("$834$", "834"), ("$\\boxed{834}$", "834"), ("\\(834\\)", "834"),
    ("\\[834\\]", "834"), ("$$834$$", "834"), ("\\boxed{$834$}", "834"), ("+834", "834"),
    ("\u2212834", "-834"), ("$-834$", "-834"), ("\\boxed{\u2212834}", "-834"), ("834.0", "834"),
    ("834.", "834"), ("0834", "834"), (" 834 ", "834"), ("1,234", "1234"), ("-1/2", "-0.5"),
    ("\\frac{3}{4}", "0.75"), ("0.75", "3/4"), ("6/8", "3/4"),
])
def test_accepted_number_forms_score_full(given, expected):
    assert numeric_accuracy(r1("x", given), expected) == 1.0
    assert numeric_accuracy(r1("x", given) + EOS + "\n" + EOS, expected) == 1.0


def test_accepted_forms_earn_full_reward_from_the_task():
    for given in ("\\boxed{834}", "$834$", "+834"):
        assert TASK.reward(EX, r1("x", given)).total == pytest.approx(1.0), given
    minus = make_example(356, "-", 478)  # -122
    assert TASK.reward(minus, r1("x", "\u2212122")).correct


def test_format_is_not_gamed_by_extra_or_nested_tags():
    for c in (r1("x", "834") + "<answer>1</answer>", r1("x", "<answer>834</answer>"),
              r1("x", "834</answer>"), "<think>\nx\n</think>\n<answer>834</answer>\n</answer>",
              r1("x <answer>834</answer>", "834"), r1("x", "834") + "</think>"):
        assert format_reward(c) == 0.0, c
    task = load_task("tool_use", digits=3)
    ex = task.examples("test", 1)[0]
    tag = f"<answer>{ex.answer}</answer>"
    assert task.reward(ex, ex.response).total == pytest.approx(1.0)
    for bad in (tag + "x</answer>", tag + "\nActually 43.", f"<answer>{ex.answer}</answer></answer>",
                f"<think>\n{tag}\n</think>"):
        r = task.reward(ex, ex.response.replace(tag, bad))
        assert r.components["format"] == 0.0 and r.total <= 0.0 + 1e-9, (bad, r)


def test_countdown_answer_only_in_think_earns_nothing():
    task = load_task("countdown")
    ex = task.examples("test", 1)[0]
    hidden = f"<think>\n<answer>{ex.answer}</answer>\n</think>"
    assert not task.reward(ex, hidden).correct
    assert not task.reward(ex, ex.response + " Actually 1 + 1.").correct


def test_text_answers_that_are_numbers_must_be_numbers():
    assert text_accuracy(r1("x", "40+2"), "42") == 0.0
    assert text_accuracy(r1("x", "84/2"), "42") == 0.0
    assert text_accuracy(r1("x", "$42$"), "42") == 1.0
    assert text_accuracy(r1("x", "1/2"), "0.5") == 1.0
    assert text_accuracy(r1("x", "4/2"), "4/2") == 1.0   # the reference's own form
    assert text_accuracy(r1("x", " paris "), "Paris") == 1.0
    assert text_accuracy("<think>\nParis\n</think>", "Paris") == 0.0
    assert text_accuracy(r1("x", "Paris") + " no, Rome", "Paris") == 0.0


@pytest.mark.parametrize("given, expected", [
    ("0,042", "42"), ("00,042", "42"), ("0,042", "0.042"), ("0,000,042", "42"),
])
def test_a_leading_zero_group_is_not_thousands(given, expected):
    """"0,042" is 0.042 with a decimal comma: reading it as 42 paid a wrong answer."""
    assert numeric_accuracy(r1("r", given), expected) == 0.0
    assert text_accuracy(r1("r", given), expected) == 0.0


@pytest.mark.parametrize("expression", ["(7 + 12) * 5 # done", "(7 + 12) * 0x5", "(7 + 1_2) * 5",
                                        "(7 + 12) * 5\n#", "(7+12)*5;"])
def test_exact_arithmetic_reads_arithmetic_only(expression):
    """Python's syntax is wider than arithmetic: a comment, a hex or underscored literal in
    an answer is not an equation the task asked for."""
    with pytest.raises(ExpressionError, match="only integers"):
        evaluate_expression(expression)
    assert evaluate_expression("(7 + 12) * 5")[0] == 95
