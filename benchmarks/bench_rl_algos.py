"""GRPO against PPO on the same checkpoint, task, prompts per step, G and lengths: peak
memory, time per step (rollout / update) and reward curves, each algorithm in its own
process (`nanoseek grpo --algo ...`) so that peak RSS is its own. PPO carries a critic as
large as the policy (and its optimizer state) and one more policy forward per rollout:
the cost GRPO was designed to remove. Writes OUT/report.md with both curves.

    PYTHONPATH=. python benchmarks/bench_rl_algos.py --init runs/speedrun-rl/sft --out runs/rl-algos \
        [--steps 20] [--option digits=2 --option ops=+] [--json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import emit, json_only_stdout, log
from nanoseek.reports.rl_report import run_summary, write_rl_report


def run(algo: str, a, out: Path) -> dict:
    cmd = [sys.executable, "-m", "nanoseek", "grpo", "--algo", algo, "--init", a.init, "--out",
           str(out), "--max-steps", str(a.steps), "--batch-size", str(a.prompts),
           "--num-generations", str(a.G), "--max-completion-length", str(a.max_len),
           "--eval-every", str(a.steps), "--eval-n", str(a.eval_n), "--no-progress"]
    for opt in a.option or []:
        cmd += ["--option", opt]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    return run_summary(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="starting checkpoint (e.g. an SFT run)")
    p.add_argument("--out", default="runs/rl-algos")
    p.add_argument("--option", action="append", help="task option KEY=VALUE (repeat)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    stdout = json_only_stdout(a.json)
    out = Path(a.out)
    runs = {"GRPO": out / "grpo", "PPO": out / "ppo"}
    res = {name: run(name.lower(), a, path) for name, path in runs.items()}
    report = write_rl_report(out, runs, "GRPO vs PPO, same start, task and batch")
    log(f"report: {report}")
    g, q = res["GRPO"], res["PPO"]
    emit({"ppo_over_grpo_step_time": q["step_s"] / g["step_s"],
          "ppo_over_grpo_peak_rss": q["peak_rss_mb"] / g["peak_rss_mb"],
          "grpo_step_s": g["step_s"], "ppo_step_s": q["step_s"],
          "grpo_peak_rss_mb": g["peak_rss_mb"], "ppo_peak_rss_mb": q["peak_rss_mb"],
          "grpo_reward_last": g["reward_last"], "ppo_reward_last": q["reward_last"],
          "steps": a.steps}, a.json, stdout, settings=vars(a))


if __name__ == "__main__":
    main()
