"""The report card of RL runs: reward and accuracy curves, held-out accuracy before and
after, and (given several runs, e.g. GRPO and PPO on the same task) their cost side by side:
median time per step (rollout / update), peak resident memory, final reward.

It reads only what the runs wrote (metrics.jsonl), so it can be re-made at any time.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from nanoseek.checkpoint.atomic import atomic_write_text
from nanoseek.reports.run_report import _plot
from nanoseek.train.run.metrics import read_metrics


def run_summary(run_dir: Path) -> dict:
    """Per-run figures from its metrics: the cost of a step and the held-out accuracy."""
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval" and "accuracy" in r]
    if not train:
        return {"steps": 0}
    med = lambda k: statistics.median(r.get(k, 0.0) for r in train)  # noqa: E731
    last = train[-max(1, len(train) // 10):]
    return {"steps": train[-1]["step"], "rollout_s": med("rollout_s"), "update_s": med("update_s"),
            "step_s": med("rollout_s") + med("update_s"),
            "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in train),
            "reward_first": train[0]["reward"], "reward_last": sum(r["reward"] for r in last) / len(last),
            "eval_start": evals[0]["accuracy"] if evals else None,
            "eval_end": evals[-1]["accuracy"] if evals else None,
            "eval_best": max(r["accuracy"] for r in evals) if evals else None}


def plot_curves(path: Path, runs: dict[str, Path], key: str, ylabel: str, kind: str = "train") -> str:
    def draw(ax):
        for i, (label, run_dir) in enumerate(runs.items()):
            pts = [(r["step"], r[key]) for r in read_metrics(run_dir)
                   if r.get("kind") == kind and r.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            k = max(1, len(ys) // 25) if kind == "train" else 1
            sm = [sum(ys[max(0, j - k + 1):j + 1]) / len(ys[max(0, j - k + 1):j + 1]) for j in range(len(ys))]
            if k > 1:
                ax.plot(xs, ys, lw=0.6, alpha=0.3, color=f"C{i}")
            ax.plot(xs, sm, "o-" if kind == "eval" else "-", color=f"C{i}", label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.legend()
    return _plot(path, draw)


def write_rl_report(out: Path, runs: dict[str, Path], title: str = "nanoseek RL",
                    extra: dict | None = None, notes: list[str] | None = None,
                    table: list[str] | None = None) -> Path:
    """report.md in `out` for the runs {label: run_dir}, plots beside it; `table`: markdown
    lines put first (e.g. a before/after comparison)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if table:
        lines += table + [""]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| run | steps | held-out acc. start | end | best | reward first -> last "
              "| s/step (rollout + update) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    for label, run_dir in runs.items():
        s = run_summary(run_dir)
        if not s["steps"]:
            continue
        lines.append(f"| {label} | {s['steps']} | {pct(s['eval_start'])} | {pct(s['eval_end'])} | "
                     f"{pct(s['eval_best'])} | {s['reward_first']:.3f} -> {s['reward_last']:.3f} | "
                     f"{s['step_s']:.2f} ({s['rollout_s']:.2f} + {s['update_s']:.2f}) | {s['peak_rss_mb']:.0f} |")
    lines += ["", f"![reward]({plot_curves(out / 'reward.png', runs, 'reward', 'mean reward per rollout')})",
              f"![accuracy]({plot_curves(out / 'train_accuracy.png', runs, 'accuracy', 'rollout accuracy')})",
              f"![held-out]({plot_curves(out / 'heldout_accuracy.png', runs, 'accuracy', 'held-out greedy accuracy', 'eval')})",
              ""]
    lines += [f"- {n}" for n in notes or []]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
