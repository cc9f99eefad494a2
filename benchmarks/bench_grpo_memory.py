"""Peak resident memory of the RL speedrun's GRPO stage, step by step.

Runs the stage exactly as `nanoseek speedrun-rl` configures it (recipes/speedrun_rl.py
`grpo_stage`: 32 prompts x G=8, 64-token completions, β=0.02 with its reference model,
an evaluation of 200 held-out problems every 10 steps and at step 0) for --steps steps
without a time limit, in this process, and samples the resident set (/proc/self/statm)
every few milliseconds from a thread: per step, the peak while sampling the rollout and
while updating, and the resident set after the step. The result is the process's VmHWM,
which the RL run starts again when it begins (train/rl/memory.py `reset_peak`; what the
`peak_rss_mb` of metrics.jsonl reports): the stage's peak, torch's and the interpreter's
own ~0.2 GB included.

--init: an SFT checkpoint (e.g. runs/speedrun-rl/sft, the speedrun's starting point; its
completions are ~37 tokens); default, a random `tiny`-preset model with a tokenizer
trained here, which writes no eos, so every completion runs to --max-len tokens (at 64,
longer packed rows than the speedrun's: more memory; at 40, about the speedrun's).

Memory varies from step to step with the packed rows' length: a step whose 32 prompts
draw the same problem twice packs both groups into one row (shared_prefix.plan_rows), ~1.6x
as long, and every row is padded to it (steps 3, 4, 43, 49, 51, 52 of seed 1337).

    PYTHONPATH=. python benchmarks/bench_grpo_memory.py [--init runs/speedrun-rl/sft]
        [--steps 20] [--max-len 64] [--threads 2] [--precision auto] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import emit, json_only_stdout, log
from nanoseek.train.rl.memory import peak_rss_mb as peak_mb  # VmHWM, which the RL run resets


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class Sampler:
    """The resident set's maximum since the last `take`, sampled every `period` seconds."""

    def __init__(self, period: float = 0.003):
        self.top, self.period = 0.0, period
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.top = max(self.top, resident_mb())
            time.sleep(self.period)

    def take(self) -> float:
        top, self.top = max(self.top, resident_mb()), 0.0
        return top


def random_checkpoint(root: Path) -> Path:
    import nanoseek
    from nanoseek.config import preset
    from nanoseek.data import default_corpus
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer
    torch.manual_seed(0)
    out = root / "init"
    nanoseek.save_pretrained(CausalLM(preset("tiny")).eval(), out)
    save_tokenizer(train_tokenizer(default_corpus()[:400], vocab_size=4096), out)
    return out


def measure(init: Path, out: Path, a) -> dict:
    """The speedrun's GRPO stage for a.steps steps, with the memory of each step."""
    from nanoseek.recipes.speedrun_rl import RL_TASK
    from nanoseek.train.rl import grpo
    from nanoseek.train.rl.config import RLConfig, rl_train_config
    from nanoseek.train.rl.run import rl
    sampler, curve, phase = Sampler(), [], {}
    rollout, train_step = grpo.RLStage.rollout, grpo.RLTrainer.train_step

    def timed_rollout(stage, r):
        sampler.take()  # what came before the rollout is the step's, not the rollout's
        batches = rollout(stage, r)
        phase["rollout_peak_mb"] = sampler.take()
        return batches

    def timed_step(trainer):
        phase.clear()
        m = train_step(trainer)
        curve.append({"step": trainer.step, **phase, "update_peak_mb": sampler.take(),
                      "rss_after_mb": resident_mb(), "hwm_mb": peak_mb()})
        log(" ".join(f"{k}={v:.0f}" for k, v in curve[-1].items()))
        return m

    grpo.RLStage.rollout, grpo.RLTrainer.train_step = timed_rollout, timed_step
    try:  # grpo_stage's settings (recipes/speedrun_rl.py), without its time limit
        cfg = RLConfig(init=str(init), task="arithmetic", task_options=dict(RL_TASK),
                       train=rl_train_config(max_steps=a.steps, batch_size=32, lr=2e-4, warmup_steps=10,
                                             eval_every=a.eval_every, save_every=a.steps,
                                             precision=a.precision),
                       num_generations=8, beta=0.02, eval_n=a.eval_n, max_completion_length=a.max_len)
        t0 = time.perf_counter()
        run = rl(out, cfg, progress=False, log=lambda *x: None)
        seconds = time.perf_counter() - t0
    finally:
        grpo.RLStage.rollout, grpo.RLTrainer.train_step = rollout, train_step
    return {"peak_rss_mb": peak_mb(), "steps": len(curve), "seconds": seconds,
            "precision": run["precision"], "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", type=Path, default=None, help="an SFT checkpoint (default: a random tiny model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--max-len", type=int, default=64, help="tokens per completion (the speedrun's: 64)")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out_stream = json_only_stdout(a.json)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        init = a.init or random_checkpoint(Path(tmp))
        out = a.out or Path(tmp) / "grpo"
        shutil.rmtree(out, ignore_errors=True)
        res = measure(init, out, a)
    curve = res.pop("curve")
    res["update_peak_max_mb"] = max(c["update_peak_mb"] for c in curve)
    res["rollout_peak_max_mb"] = max(c.get("rollout_peak_mb", 0.0) for c in curve)
    res["rss_after_last_step_mb"] = curve[-1]["rss_after_mb"]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    emit({**res, **({"curve": curve} if a.json else {})}, a.json, out_stream, settings=settings)


if __name__ == "__main__":
    main()
