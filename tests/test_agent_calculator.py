"""The calculator under attack: expressions whose work C code would do while holding the GIL
(`round(1, -10**8)` computes 10**100000000), long product chains, results past Python's
4,300-digit int-to-str limit; and the toolbox's isolated tools, whose timeout kills a
child process instead of abandoning a thread that cannot be stopped."""

import decimal
import json
import math
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nanoseek.agent.tools.base import Tool, ToolBox, ToolError
from nanoseek.agent.tools.calculator import MAX_DIGITS, calculator_tool, evaluate, format_number


def _digits(n: int) -> str:
    """n in decimal, whatever this process's int-to-str limit (Decimal has none)."""
    return str(decimal.Decimal(n))


# --------------------------------------------------------- GIL-holding attacks
ATTACK = textwrap.dedent("""
    import json, sys, threading, time
    from nanoseek.agent.tools.base import ToolBox
    from nanoseek.agent.tools.calculator import calculator_tool
    beats = [0]
    def heartbeat():
        while True:
            beats[0] += 1
            time.sleep(0.01)
    threading.Thread(target=heartbeat, daemon=True).start()
    box = ToolBox([calculator_tool()], timeout_s=5)
    for expr in sys.argv[1:]:
        before, t0 = beats[0], time.perf_counter()
        obs = box.call("calculator", {"expression": expr})
        print(json.dumps([expr, time.perf_counter() - t0, beats[0] - before, obs.ok, obs.text[:300]]),
              flush=True)
""")
GIL_ATTACKS = ["round(1, -10**8)", "round(7, -(10**100))", "round(123456789, -10**9)",
               "factorial(1e6)", "factorial(10**7)", "10**10**8", "(-3)**(10**9)",
               "2**4000*2**4000*2**4000*2**4000*2**4000*2**4000*2**4000*2**4000*2**4000",
               "*".join(["9**9"] * 2000), "*".join(["(2**4000)"] * 1500)]


def test_gil_holding_expressions_neither_freeze_nor_run_unbounded():
    """Each call comes back within seconds while another thread keeps beating; run in a
    subprocess so that a frozen interpreter fails the test instead of hanging it."""
    try:
        out = subprocess.run([sys.executable, "-c", ATTACK, *GIL_ATTACKS], capture_output=True,
                             text=True, timeout=90, cwd=os.getcwd())
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the agent froze; it had printed: {e.stdout}")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r[0] for r in rows] == GIL_ATTACKS
    for expr, seconds, beats, ok, text in rows:
        assert seconds < 10, (expr[:40], seconds, text)
        assert beats > 0 or seconds < 0.05, (expr[:40], seconds)   # the heartbeat thread ran
    results = {r[0]: r[4] for r in rows}
    assert results["round(1, -10**8)"] == "0" and results["round(7, -(10**100))"] == "0"
    assert results["round(123456789, -10**9)"] == "0"
    for expr in GIL_ATTACKS[3:]:
        assert results[expr].startswith("error: calculator: "), results[expr]
        assert any(w in results[expr] for w in ("10,000 digits", "integer", "nested too deeply")), results[expr]


def test_round_to_negative_digits_is_exact():
    assert evaluate("round(123456, -3)") == 123000
    assert evaluate("round(1, -(10**5))") == 0                      # 10**8: the subprocess test above
    assert evaluate("round(-5 * 10**9999, -10000)") == 0           # half to even, like Python
    assert evaluate("round(2.675, 2)") == round(2.675, 2) and evaluate("round(1.5, 10**100)") == 1.5


# ------------------------------------------------------------ the size bound
def test_results_up_to_the_bound_print_whole():
    box = ToolBox([calculator_tool()])
    obs = box.call("calculator", {"expression": "7**6000"})
    assert obs.ok and obs.text == _digits(7 ** 6000) and len(obs.text) == 5071
    largest = box.call("calculator", {"expression": "10**10000 - 1"})  # 10**10000 is refused
    assert not largest.ok and "10,000 digits" in largest.text
    assert box.call("calculator", {"expression": "10**9999 - 1 + 10**9999 * 8"}).text == "8" + "9" * 9999
    assert len(box.call("calculator", {"expression": "factorial(3248)"}).text) == 9998
    # a result fed back as an operand: a literal past the 4,300-digit default parses too
    assert evaluate("9" * MAX_DIGITS + " // 3") == int(decimal.Decimal("3" * MAX_DIGITS))
    assert evaluate("1_" * 5000 + "0 * 1") == int(decimal.Decimal("1" * 5000 + "0"))


@pytest.mark.parametrize("expr,words", [
    ("10**10000", ["10**10000", "10,000 digits"]),
    ("10**9999 * 10", ["10,000 digits"]),
    ("(10**5000)**2", ["10,000 digits"]),
    ("factorial(3249)", ["factorial(3249)", "10,000 digits"]),
    ("factorial(1e3)", ["factorial", "integer"]),
    ("factorial(-1)", ["factorial"]),
    ("9" * (MAX_DIGITS + 1), ["10,001 digits", "10,000 digits"]),
    ("0x" + "f" * 9000, ["10,000 digits"]),
    ("1 + " * 20_000 + "1", ["characters"]),
    ("1e308 * 10", ["float"]),
    ("10**400 / 3", ["float"]),
    ("gcd(1.5, 2)", ["gcd"]),
    ("min()", ["min"]),
    ("round(1, 0.5)", ["round"]),
    ("-" * 5000 + "1", ["nested"]),
    ("1" * 6000 + " ** 2", ["<6000-digit number> ** 2 is too large", "10,000 digits"]),
    ("1" * 200 + " + _n0", ["'_n0' is not allowed"]),            # no name for a long literal
    ("1__" + "1" * 200, ["not an expression"]),
])
def test_bounds_are_clear_errors(expr, words):
    t0 = time.perf_counter()
    with pytest.raises(ToolError) as e:
        evaluate(expr)
    assert time.perf_counter() - t0 < 5
    assert str(e.value).startswith("calculator: ") and len(str(e.value)) < 1000
    for w in words:
        assert w in str(e.value), str(e.value)


def test_the_size_bound_is_exact():
    assert evaluate("10**9999") == 10 ** 9999 and evaluate("-(10**9999)") == -(10 ** 9999)
    assert evaluate("2**33219") == 2 ** 33219                      # 10,000 digits
    with pytest.raises(ToolError, match="10,000 digits"):
        evaluate("2**33220")                                      # 10,001 digits
    assert evaluate("1 + 2 + 3 + " * 300 + "0") == 1800             # long sums still work


def test_format_number_ignores_the_processes_int_str_limit():
    assert format_number(10 ** 9999) == "1" + "0" * 9999
    assert format_number(-(7 ** 6000)) == "-" + _digits(7 ** 6000)
    assert format_number(3.5) == "3.5" and format_number(0) == "0"


# ------------------------------------------------------------ isolated tools
def _children() -> set[int]:
    """This process's descendants (from /proc), less multiprocessing's resource tracker
    (started once, by the first spawned child, and kept for the life of the process)."""
    parent = {}
    for stat in os.listdir("/proc"):
        try:
            with open(f"/proc/{stat}/stat") as f:
                parent[int(stat)] = int(f.read().rpartition(")")[2].split()[1])
        except (ValueError, OSError):
            continue
    found, todo = set(), [os.getpid()]
    while todo:
        me = todo.pop()
        kids = [pid for pid, ppid in parent.items() if ppid == me]
        found.update(kids)
        todo.extend(kids)
    return {pid for pid in found if b"resource_tracker" not in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_an_isolated_gil_holding_tool_times_out_and_leaves_no_process():
    """A C-level busy loop (10**(10**8)) holds the GIL: a thread could not be stopped, the
    child process is killed, and the caller's other threads run throughout."""
    before = _children()
    beats, stop = [0], threading.Event()

    def heartbeat():
        while not stop.is_set():
            beats[0] += 1
            time.sleep(0.01)

    th = threading.Thread(target=heartbeat, daemon=True)
    th.start()
    busy = Tool("busy", "", {"type": "object"}, lambda: str(10 ** (10 ** 8)), timeout_s=1, isolate=True)
    t0, start_beats = time.perf_counter(), beats[0]
    obs = ToolBox([busy]).call("busy", {})
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join()
    assert not obs.ok and "timed out" in obs.text and elapsed < 10
    assert beats[0] - start_beats > 10                    # about 100 at one beat per 10 ms
    assert _children() - before == set()


def test_isolated_tools_report_like_threaded_ones():
    def crash():
        raise RuntimeError("kaput")
    box = ToolBox([Tool("crash", "", {"type": "object"}, crash, isolate=True),
                   Tool("refuse", "", {"type": "object"}, lambda: (_ for _ in ()).throw(ToolError("no")),
                        isolate=True),
                   Tool("add", "", {"type": "object"}, lambda a, b: a + b, isolate=True),
                   Tool("exit", "", {"type": "object"}, lambda: os._exit(3), isolate=True)])
    assert box.call("crash", {}).text == "error: crash failed: RuntimeError: kaput"
    assert box.call("refuse", {}).text == "error: no"
    assert box.call("add", {"a": 2, "b": 3}).text == "5"
    assert box.call("add", {"a": 2}).text.startswith("error: add:")        # a missing argument
    died = box.call("exit", {})
    assert not died.ok and "exit" in died.text and "3" in died.text
    assert box.call("add", {"a": "x" * 1_000_000, "b": "y"}).text == "x" * 1_000_000 + "y"  # > a pipe's buffer


def test_the_calculator_runs_isolated():
    assert calculator_tool().isolate
    assert ToolBox([calculator_tool()]).call("calculator", {"expression": "123 * 456"}).text == "56088"


def test_spawn_fallback_runs_and_kills():
    """Where fork is not safe (not Linux), the child is spawned: same results, same kill."""
    from nanoseek.agent.tools.isolation import ChildTimeout, run_in_child
    before = _children()
    assert run_in_child(operator.add, (2, 3), 60, method="spawn") == 5
    with pytest.raises(ChildTimeout):
        run_in_child(pow, (10, 10 ** 8), 1, method="spawn")
    assert _children() - before == set()
    assert run_in_child(math.factorial, (20,), 10, method="fork") == math.factorial(20)
