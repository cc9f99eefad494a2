"""The report card of a run: `report.md` and its PNG plots, from run.json + metrics.jsonl.

It reads only what the run wrote, so it can be re-made at any time (even mid-run):
`nanoseek report runs/NAME`.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.checkpoint.atomic import atomic_write, atomic_write_text
from nanoseek.train.run.metrics import read_metrics


def _fmt(x, digits=4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _plot(path: Path, draw) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path.name


def plot_loss(run_dir: Path, train: list[dict], evals: list[dict], run: dict) -> str:
    def draw(ax):
        xs = [r["tokens"] for r in train]
        lm = [r.get("lm_loss", r["loss"]) for r in train]
        ax.plot(xs, lm, lw=0.6, alpha=0.35, color="C0")
        k = max(1, len(lm) // 50)  # moving average for a readable curve
        sm = [sum(lm[max(0, i - k + 1):i + 1]) / len(lm[max(0, i - k + 1):i + 1]) for i in range(len(lm))]
        ax.plot(xs, sm, color="C0", label="train (next-token CE)")
        mtp = [(r["tokens"], r["mtp_loss"]) for r in train if r.get("mtp_loss") is not None]
        if mtp:
            ax.plot(*zip(*mtp), lw=0.6, alpha=0.5, color="C2", label="train MTP CE (depth 1)")
        ev = [(r["tokens"], r["val_loss"]) for r in evals if "val_loss" in r]
        if ev:
            ax.plot(*zip(*ev), "o-", color="C1", label="validation")
        if run.get("unigram_loss") is not None:
            ax.axhline(run["unigram_loss"], ls="--", color="gray", label="unigram baseline")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats / token)")
        ax.legend()
    return _plot(run_dir / "loss.png", draw)


def plot_expert_load(run_dir: Path, train: list[dict], names: list[str]) -> str | None:
    rows = [r for r in train if r.get("max_violation")]
    if not rows:
        return None

    def draw(ax):
        n_layers = len(rows[0]["max_violation"])
        for j in range(n_layers):
            ys = [r["max_violation"][j] for r in rows]
            k = max(1, len(ys) // 50)
            sm = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
            ax.plot([r["step"] for r in rows], sm, label=names[j] if j < len(names) else f"MoE layer {j}")
        ax.set_xlabel("step")
        ax.set_ylabel("max load / mean load - 1")
        ax.set_title("Expert-load balance (aux-loss-free bias update)")
        ax.legend(fontsize=8)
    return _plot(run_dir / "expert_load.png", draw)


def plot_lr(run_dir: Path, train: list[dict]) -> str:
    def draw(ax):
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
    return _plot(run_dir / "lr.png", draw)


def _thread_mix(train: list[dict]) -> str:
    counts: dict = {}
    for r in train:
        if "threads" in r:
            counts[r["threads"]] = counts.get(r["threads"], 0) + 1
    return ", ".join(f"{n} thread(s): {c} steps" for n, c in sorted(counts.items())) or "fixed"


METHOD_NOTES = (
    "Method notes: loss curves are the next-token cross-entropy (the MTP and balance "
    "terms are logged beside it in metrics.jsonl). Bits per byte = validation nats on "
    "text tokens / (ln 2 x their UTF-8 bytes). The unigram baseline is the training "
    "split's token frequencies (add-one smoothed) scored on the same validation windows. "
    "MFU = model FLOPs per token (nanoseek.calc: 6 x activated matmul parameters, the MTP "
    "module included, + causal attention) "
    "x tokens/s / the matmul peak measured on this machine.\n")


def write_report(run_dir: str | Path, title: str | None = None, extra: dict | None = None) -> Path:
    """Write run_dir/report.md (+ PNGs); returns its path."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval" and "val_loss" in r]
    samples = [r for r in metrics if r.get("kind") == "sample"]
    if not train:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training steps yet")
    loss_png = plot_loss(run_dir, train, evals, run)
    load_png = plot_expert_load(run_dir, train, run.get("moe_layers", []))
    lr_png = plot_lr(run_dir, train)
    rows = (headline_rows(run, train, evals) + arch_rows(run, train)
            + list({**run.get("report_extra", {}), **(extra or {})}.items()))
    L = [f"# {title or 'nanoseek run'}: {run_dir.name}\n", "## Headline\n", "| metric | value |\n|---|---|"]
    L += [f"| {k} | {v} |" for k, v in rows]
    L += ["", "## Curves\n", f"![loss]({loss_png})\n"]
    if load_png:
        L.append(f"![expert load]({load_png})\n")
    L.append(f"![learning rate]({lr_png})\n")
    from nanoseek.reports.distributed import parallel_section
    L += parallel_section(run, train)  # empty unless several processes trained the run
    L += comparison_section(run.get("comparison"))
    L += validation_section(evals) + samples_section(samples) + data_section(run)
    L += configuration_section(run) + [METHOD_NOTES]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(L))
    return path


def headline_rows(run: dict, train: list[dict], evals: list[dict]) -> list[tuple[str, str]]:
    """The headline table: validation against the unigram baseline, size, throughput, balance."""
    params, summary = run["params"], run.get("summary") or {}
    tokens, elapsed = train[-1]["tokens"], train[-1]["elapsed"]
    tok_s = tokens / elapsed if elapsed else 0.0
    mfu = run["flops_per_token"] * tok_s / run["peak_flops"] if run.get("peak_flops") else None
    final = evals[-1] if evals else {}
    best = min(evals, key=lambda r: r["val_loss"]) if evals else {}
    return [
        ("final validation loss (nats/token)", _fmt(final.get("val_loss"))),
        ("final validation bits per byte", _fmt(final.get("val_bpb"))),
        ("best validation loss (step)", f"{_fmt(best.get('val_loss'))} ({best.get('step', 'n/a')})"),
        ("unigram baseline loss (nats/token)", _fmt(run.get("unigram_loss"))),
        ("unigram baseline bits per byte", _fmt(run.get("unigram_bpb"))),
        ("parameters, total", f"{params['total']:,} main model + {params['mtp']:,} MTP module"
         if "total_with_mtp" in params else f"{params['total']:,} (MTP module: {params['mtp']:,})"),
        ("parameters, activated per token",
         f"{params['activated']:,} main model (embedding table excluded) + "
         f"{params['mtp_activated']:,} MTP module" if "mtp_activated" in params else f"{params['activated']:,}"),
        ("tokens seen", f"{tokens:,} ({tokens / max(1, run['data']['train_tokens']):.1f} passes over "
                        "the training split)"),
        ("optimizer steps", f"{train[-1]['step']:,}" + (" (stopped by the time limit)"
                                                        if summary.get("stopped_early") else "")),
        ("training time (s)", _fmt(elapsed, 1)),
        ("throughput (tokens/s)", _fmt(tok_s, 0)),
        ("model FLOPs per token", f"{run['flops_per_token'] / 1e6:.1f} M"),
        ("measured matmul peak", f"{run['peak_flops'] / 1e9:.1f} GFLOP/s ({run['device']}, "
                                 f"{run.get('cores', run['threads'])} cores; training used "
                                 f"{run['threads']} threads)"),
        ("threads used per step (adaptive runs)", _thread_mix(train)),
        ("MFU", f"{100 * mfu:.1f} %" if mfu is not None else "n/a"),
        ("precision", run.get("precision")),
        ("expert-load max violation, mean of the last 10 % of steps", _balance(run, train)),
    ]


def _balance(run: dict, train: list[dict]) -> str:
    last_viol = train[-1].get("max_violation") or []
    tail = train[-max(1, len(train) // 10):]
    mean_viol = [sum(r["max_violation"][j] for r in tail) / len(tail) for j in range(len(last_viol))]
    return ", ".join(f"{n}: {v:.3f}" for n, v in zip(run.get("moe_layers") or range(len(mean_viol)),
                                                     mean_viol)) or "n/a"


def arch_rows(run: dict, train: list[dict]) -> list[tuple[str, str]]:
    """V3.2's and V4's own metrics (train/numerics/arch_metrics.py), for a run that logged
    them: where each started (the first logged interval) and where it ended (the mean of
    the last 10 % of the records). A V3 run has none of them and gets no row."""
    tail = train[-max(1, len(train) // 10):]
    rows = []

    def series(key):
        return [r[key] for r in train if r.get(key) is not None]

    def mean(rs, key):
        xs = [r[key] for r in rs if r.get(key) is not None]
        return sum(xs) / len(xs) if xs else None
    if series("indexer_kl"):
        rows.append(("indexer KL to the main attention, mean over layers: first -> last 10 %",
                     f"{series('indexer_kl')[0]:.4f} -> {mean(tail, 'indexer_kl'):.4f}"))
    if series("indexer_loss"):
        rows.append(("indexer loss in the objective (coef x sum over layers), last 10 %",
                     _fmt(mean(tail, "indexer_loss"))))
    if series("hash_max_load"):
        names = [n for n in run.get("moe_layers", []) if n.endswith("(hash)")]
        n = len(train[-1]["hash_max_load"])
        loads = [sum(r["hash_max_load"][j] for r in tail) / len(tail) for j in range(n)]
        rows.append(("hash-routed layers: busiest expert's load / mean load, last 10 %",
                     ", ".join(f"{names[j] if j < len(names) else f'hash layer {j}'}: {v:.3f}"
                               for j, v in enumerate(loads))))
    if series("mhc_comb_error"):
        errs = series("mhc_comb_error")
        rows.append(("mHC comb: max |row or column sum - 1| (distance from doubly stochastic): "
                     "largest logged / last 10 %", f"{max(errs):.2e} / {mean(tail, 'mhc_comb_error'):.2e}"))
    return rows


def comparison_section(c: dict | None) -> list[str]:
    """This speedrun's validation bits per byte beside the V3 speedrun's (recipes/speedrun.py
    `comparison`), or a plain statement that there was none to compare with."""
    if not c:
        return []
    me, base = c["this"], c.get("baseline")
    L = ["## Against the V3 speedrun\n"]
    if base is None:
        return L + [f"No V3 speedrun was found to compare with (looked in {', '.join(c['looked_in'])}); "
                    "run `nanoseek speedrun` beside this run, or pass `--compare RUN_DIR`.\n"]
    if base.get("val_bpb") is None:
        return L + [f"{base['dir']} holds no validation bits per byte to compare with.\n"]
    delta = me["val_bpb"] - base["val_bpb"]
    L += ["| | this run | V3 speedrun |\n|---|---|---|",
          f"| preset | {me['preset']} | {base['preset']} ({base['dir']}) |",
          f"| validation bits per byte (reloaded checkpoint) | {me['val_bpb']:.4f} | {base['val_bpb']:.4f} |",
          f"| optimizer steps | {_fmt(me['steps'])} | {_fmt(base['steps'])} |",
          f"| tokens seen | {_fmt(me['tokens'])} | {_fmt(base['tokens'])} |",
          f"| training time (s) | {_fmt(me['train_s'], 1)} | {_fmt(base['train_s'], 1)} |",
          f"| wall time, all stages (s) | {_fmt(me['wall_s'], 0)} | {_fmt(base['wall_s'], 0)} |", ""]
    verdict = "lower (better)" if delta < 0 else "higher (worse)" if delta > 0 else "equal"
    L.append(f"Bits per byte {delta:+.4f}: {verdict} than the V3 speedrun's, "
             + ("on the same validation bytes." if base.get("same_validation_bytes") else
                "but the two runs scored different validation bytes (another corpus, seed or "
                "val_fraction), so the figures are not strictly comparable.") + "\n")
    return L


def validation_section(evals: list[dict]) -> list[str]:
    L = ["## Validation\n", "| step | tokens | loss | bits/byte |\n|---|---|---|---|"]
    L += [f"| {r['step']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r.get('val_bpb', float('nan')):.4f} |"
          for r in evals]
    return L + [""]


def samples_section(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    L = [f"## Samples (step {samples[-1]['step']}, temperature 0.8, top-k 40)\n"]
    L += ["```text\n" + s.replace("```", "'''") + "\n```" for s in samples[-1]["samples"]]
    return L + [""]


def data_section(run: dict) -> list[str]:
    from nanoseek.train.run.run_settings import DEFAULT_SOURCE, settings_of

    d = run["data"]
    sources = settings_of(run)["data"].get("paths") or [DEFAULT_SOURCE]
    return ["## Data\n",
            f"Sources: {', '.join(sources)}. {d['train_tokens']:,} training tokens "
            f"({d['train_docs']} documents), {d['val_tokens']:,} validation tokens "
            + (f"({d['val_docs']} documents, {d['val_bytes']:,} bytes)" if d["val_docs"] else
               "(the tail of the single document's tokens"
               + (f", {d['val_bytes']:,} bytes)" if d.get("tail_split") else ")"))
            + f"; vocabulary {d['vocab_size']:,}.\n"]


def configuration_section(run: dict) -> list[str]:
    from nanoseek.train.run.run_settings import settings_of

    settings = settings_of(run)
    mc = {k: v for k, v in settings["model"].items() if k not in ("architectures",)}
    return ["## Configuration\n",
            "Training:\n\n```json\n" + json.dumps(settings["train"], indent=1) + "\n```\n",
            "Model (config.json):\n\n```json\n" + json.dumps(mc, indent=1, sort_keys=True) + "\n```\n"]
