"""The run report's "Distributed training" section: the layout, and what expert placement
cost per step (from the metrics the parallel runtime logs)."""

from __future__ import annotations


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def parallel_section(run: dict, train: list[dict]) -> list[str]:
    """Empty for a single-process run."""
    layout = run.get("parallel")
    if not layout:
        return []
    L = ["## Distributed training\n",
         f"{layout['world']} processes ({layout['backend']}): dp={layout['dp']} "
         f"({'dense weights replicated, gradients all-reduced' if layout.get('replicate') else 'FSDP2 over dense weights'}), "
         f"ep={layout['ep']} (routed experts, all-to-all), "
         f"tp={layout['tp']}, pp={layout.get('pp', 1)}.\n"]
    rows = [r for r in train if "ranks_per_token" in r]
    if rows:
        load = [sum(r["load_per_rank"][i] for r in rows) / len(rows) for i in range(len(rows[0]["load_per_rank"]))]
        mean_load = sum(load) / len(load)
        a2a = _mean(rows, "a2a_s") if "a2a_s" in rows[0] else None
        step_s = [r["elapsed"] for r in train]
        L += ["| expert placement, mean per logged step | value |", "|---|---|",
              f"| ranks visited per token (bound) | {_mean(rows, 'ranks_per_token'):.3f} "
              f"(max {max(r['ranks_per_token_max'] for r in rows):.0f}, bound {rows[0]['ranks_bound']:.0f}) |",
              f"| token-slots sent to other ranks | {_mean(rows, 'a2a_remote_slots'):,.0f} |",
              f"| bytes moved (dispatch + combine) | {_mean(rows, 'a2a_bytes'):,.0f} |",
              f"| load per rank (slots) | {', '.join(f'{v:,.0f}' for v in load)} "
              f"(max/mean {max(load) / max(mean_load, 1e-9):.3f}) |"]
        if a2a is not None and len(step_s) > 1:
            per_step = (step_s[-1] - step_s[0]) / max(train[-1]["step"] - train[0]["step"], 1)
            L.append(f"| all-to-all seconds per step | {a2a:.4f} ({100 * a2a / max(per_step, 1e-9):.1f} % of the step) |")
    grads = [r for r in train if "expert_grad_norm_max" in r]
    if grads:
        L.append(f"| per-expert gradient norm, last step: max / mean / min | "
                 f"{grads[-1]['expert_grad_norm_max']:.4f} / {grads[-1]['expert_grad_norm_mean']:.4f} / "
                 f"{grads[-1]['expert_grad_norm_min']:.4f} (global norm {grads[-1]['grad_norm']:.4f}) |")
    return L + [""]
