"""Benchmark results in one page: docs/benchmarks.md, written from the benchmarks' `--json`
outputs, which are kept beside it in docs/benchmarks/NAME.json so the page can be
rewritten without rerunning anything.

    python benchmarks/write_results.py                              # rewrite the page from docs/benchmarks/*.json
    python benchmarks/write_results.py --run bench_model "bench_engine --train-seconds 60"
    python benchmarks/write_results.py --from results/*.json        # saved `bench_X.py --json` outputs

`--run` runs each benchmark (a name, then its own arguments if any) with `--json`, checks that
its stdout is JSON alone, and replaces that benchmark's kept output; the others' stay. Each
output carries its machine (date, CPU model and flags, cores, torch, load average) and its
settings (benchmarks/common.py `emit`), so the page states where every figure came from.
For each benchmark the page gives its command, machine, goals (benchmarks/goals.py) against
its figures, and every figure it printed.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goals import GOALS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
RAW_DIR = ROOT / "docs" / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
META = ("benchmark", "command", "settings", "machine")
# the page's order: the model, training, scaling, inference, RL, agent, serving
ORDER = ("bench_model", "bench_memory_v4", "bench_train", "bench_parallel", "bench_precision", "bench_engine",
         "bench_grpo", "bench_rl_algos", "bench_agent", "load_server")


# ------------------------------------------------------------------ collecting outputs
def parse_output(text: str, source: str) -> dict:
    """A benchmark's stdout under --json: one JSON object and nothing else."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: stdout is not JSON alone ({e}); it starts {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object of results, got {type(data).__name__}")
    return data


def keep(data: dict, name: str, raw_dir: Path) -> Path:
    """Store one output as raw_dir/NAME.json (replacing that benchmark's previous one)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    path = raw_dir / f"{Path(str(data.get('benchmark') or name)).name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run_benchmark(spec: str, raw_dir: Path, bench_dir: Path = BENCH_DIR) -> Path:
    """Run `NAME [ARGS...]` (benchmarks/NAME.py) with --json; its progress goes to our stderr."""
    name, *args = shlex.split(spec)
    script = bench_dir / f"{name.removesuffix('.py')}.py"
    if not script.is_file():
        raise ValueError(f"{name}: no such benchmark ({script.name} not in {bench_dir.name}/)")
    print(f"running {script.name} {' '.join(args)}".rstrip(), file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, str(script), "--json", *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} exited with {proc.returncode}")
    return keep(parse_output(proc.stdout, script.name), script.stem, raw_dir)


def import_file(path: Path, raw_dir: Path) -> Path:
    """A saved `--json` output; an output without a `benchmark` field is named by its file."""
    return keep(parse_output(path.read_text(), str(path)), path.stem, raw_dir)


def load_records(raw_dir: Path) -> list[tuple[str, dict]]:
    records = [(p.stem, parse_output(p.read_text(), str(p))) for p in sorted(raw_dir.glob("*.json"))]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(records, key=lambda r: (rank.get(r[0], len(ORDER)), r[0]))


# ------------------------------------------------------------------------ formatting
def fmt(value) -> str:
    """Figures as the benchmarks print them: 4 significant digits, thousands separated."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def what_it_measures(name: str, bench_dir: Path = BENCH_DIR) -> str | None:
    """The first paragraph of the benchmark's docstring, read without importing it."""
    script = bench_dir / f"{name}.py"
    if not script.is_file():
        return None
    doc = ast.get_docstring(ast.parse(script.read_text()))
    return " ".join(doc.split("\n\n")[0].split()) if doc else None


# --------------------------------------------------------------------------- machine
MACHINE_FIELDS = ("cpu", "cpu_flags", "cores", "torch", "transformers", "python")


def machine_key(machine: dict) -> str:
    return json.dumps({k: machine.get(k) for k in MACHINE_FIELDS}, sort_keys=True)


def flags_text(flags: dict | None) -> str:
    if flags is None:
        return "not read (no /proc/cpuinfo)"
    have = [f for f, on in flags.items() if on]
    lack = [f for f, on in flags.items() if not on]
    return (", ".join(have) or "none of " + ", ".join(flags)) + (f" (no {', '.join(lack)})" if have and lack else "")


def load_text(machine: dict) -> str:
    start, end = machine.get("load_average_1min_start"), machine.get("load_average_1min_end")
    return f"{fmt(start)} → {fmt(end)}"


def load_sentence(machines: list[dict]) -> str:
    """The load the figures were taken under, from the recorded load averages."""
    loads = [v for m in machines for v in (m.get("load_average_1min_start"), m.get("load_average_1min_end"))
             if isinstance(v, (int, float))]
    if not loads:
        return "No load average was recorded."
    cores = max(m.get("cores") or 0 for m in machines)
    span = f"{min(loads):.2f}–{max(loads):.2f}" if min(loads) != max(loads) else f"{loads[0]:.2f}"
    if any(loaded(m) for m in machines):
        return (f"The 1-minute load average was {span} on {cores} cores during these runs: other "
                "processes were using the CPUs, so these figures, ratios included, were taken under "
                "that load; they are lower, and vary more from run to run, than on an idle machine "
                "of this kind.")
    return f"The 1-minute load average was {span} on {cores} cores during these runs."


def loaded(machine: dict) -> bool:
    """More runnable processes than cores at the start or end of the run."""
    cores = machine.get("cores") or 0
    return any(isinstance(v, (int, float)) and cores and v > cores
               for v in (machine.get("load_average_1min_start"), machine.get("load_average_1min_end")))


def machine_section(records: list[tuple[str, dict]]) -> list[str]:
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, data in records:
        machine = data.get("machine")
        if machine:
            groups.setdefault(machine_key(machine), []).append((name, machine))
    lines = ["## Machine", ""]
    for i, members in enumerate(groups.values(), 1):
        m = members[0][1]
        if len(groups) > 1:
            lines += [f"### Machine {i}", ""]
        lines += table(("", ""), [("CPU", m.get("cpu") or "–"), ("CPU flags", flags_text(m.get("cpu_flags"))),
                                  ("cores (this process's affinity)", fmt(m.get("cores"))),
                                  ("torch", fmt(m.get("torch"))), ("transformers", fmt(m.get("transformers"))),
                                  ("python", fmt(m.get("python")))])
        lines += [""] + table(("benchmark", "date", "1-minute load average, start → end"),
                              [(f"[{n}](#{n})", fmt(mm.get("date")), load_text(mm))
                               for n, mm in members])
        lines += ["", load_sentence([mm for _, mm in members]), ""]
    missing = [name for name, data in records if not data.get("machine")]
    if missing:
        lines += [f"Not recorded for {', '.join(missing)} (an output saved before outputs carried "
                  "their machine).", ""]
    return lines


# ------------------------------------------------------------------------- sections
def goal_rows(name: str, results: dict, under_load: bool = False) -> list[tuple[str, ...]]:
    rows = []
    for g in GOALS.get(name, ()):
        value = results.get(g.key)
        met = g.met(value)
        verdict = "not measured" if met is None else ("met" if met else "**not met**")
        if met is not None and under_load:
            verdict += " (under load)"
        rows.append((f"`{g.key}` {'≥' if g.op == '>=' else '≤' if g.op == '<=' else '='} {fmt(g.threshold)}: "
                     f"{g.meaning}", fmt(value), verdict))
    return rows


def benchmark_section(name: str, data: dict, bench_dir: Path = BENCH_DIR) -> list[str]:
    results = {k: v for k, v in data.items() if k not in META}
    lines = [f"## {name}", ""]
    about = what_it_measures(name, bench_dir)
    if about:
        lines += [about, ""]
    command = data.get("command")
    lines.append(f"- Command: `{' '.join(shlex.quote(c) for c in command)}`." if command
                 else "- Command: not recorded.")
    settings = data.get("settings")
    lines.append("- Settings: " + (", ".join(f"`{k}={fmt(v)}`" for k, v in settings.items()) + "."
                                 if settings else "not recorded."))
    machine = data.get("machine") or {}
    omp = f", `OMP_NUM_THREADS={machine['omp_num_threads']}`" if machine.get("omp_num_threads") else ""
    lines.append(f"- Run: {fmt(machine.get('date'))}, 1-minute load average {load_text(machine)}{omp} "
                 f"([raw output](benchmarks/{name}.json))." if machine
                 else f"- Run: not recorded ([raw output](benchmarks/{name}.json)).")
    lines.append("")
    if GOALS.get(name):  # the figure the benchmark is judged by
        head = GOALS[name][0].key
        lines += [f"Headline: `{head}` = **{fmt(results.get(head))}**.", ""]
    rows = goal_rows(name, results, loaded(machine))
    if rows:
        lines += table(("goal", "measured", ""), rows) + [""]
    lines += table(("figure", "value"), [(f"`{k}`", fmt(v)) for k, v in results.items()]) + [""]
    return lines


def render_page(records: list[tuple[str, dict]], bench_dir: Path = BENCH_DIR) -> str:
    lines = ["# Benchmark results", "",
             "<!-- Written by benchmarks/write_results.py from docs/benchmarks/*.json: rerun it, "
             "do not edit this page. -->", "",
             "Each section is one benchmark's latest run: its command and settings, its goals "
             "against the figures it printed, and every figure of its `--json` output. The raw "
             "outputs are kept in [benchmarks/](benchmarks/); earlier runs, on other machines, "
             "are in [log.md](log.md#benchmarks).", "",
             "Rewrite this page from the kept outputs: `python benchmarks/write_results.py`. "
             "Rerun benchmarks and rewrite it: `python benchmarks/write_results.py --run "
             "bench_model \"bench_engine --train-seconds 60\"` (`make bench` reruns all that need "
             "no checkpoint).", ""]
    if not records:
        return "\n".join(lines + ["No results yet.", ""])
    lines += ["Benchmarks: " + ", ".join(f"[{n}](#{n})" for n, _ in records) + ".", ""]
    lines += machine_section(records)
    for name, data in records:
        lines += benchmark_section(name, data, bench_dir)
    return "\n".join(lines).rstrip() + "\n"


def write_page(raw_dir: Path = RAW_DIR, page: Path = PAGE, bench_dir: Path = BENCH_DIR) -> Path:
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_page(load_records(raw_dir), bench_dir))
    return page


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run", nargs="+", metavar="BENCH", default=[],
                   help='benchmarks to run, each a name and optionally its arguments: "bench_engine --repeats 1"')
    p.add_argument("--from", dest="sources", nargs="+", type=Path, metavar="FILE", default=[],
                   help="saved --json outputs to keep (replacing those benchmarks' kept outputs)")
    p.add_argument("--raw", type=Path, default=RAW_DIR, help="where the outputs are kept (default docs/benchmarks)")
    p.add_argument("--out", type=Path, default=PAGE, help="the page (default docs/benchmarks.md)")
    a = p.parse_args(argv)
    failed = []
    for source in a.sources:
        try:
            print(f"kept {import_file(source, a.raw)}", file=sys.stderr)
        except (OSError, ValueError) as e:
            failed.append(str(e))
    for spec in a.run:
        try:
            print(f"kept {run_benchmark(spec, a.raw)}", file=sys.stderr)
        except (RuntimeError, ValueError) as e:
            failed.append(str(e))
    print(f"wrote {write_page(a.raw, a.out)}", file=sys.stderr)
    for msg in failed:
        print(f"error: {msg}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
