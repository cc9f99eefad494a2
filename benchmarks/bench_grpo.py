"""GRPO steps per minute: nanoseek (rollouts by its engine: paged latent cache, prefix
sharing across the G completions of a prompt, continuous batching) against TRL's
GRPOTrainer (rollouts by transformers' `generate`) on the same model, task, prompts per
step, G, completion length, β and loss, in one process.

The model is the `tiny` preset (random weights unless --init gives a checkpoint), saved
with nanoseek.save_pretrained and loaded by transformers for TRL (its fastest CPU experts
path, eager, per bench_train.py). A random model never writes eos, so every completion runs
to --max-len on both sides: the same tokens generated and trained per step. Each side runs
--steps steps after one warm-up step; the median step time is used.
TRL decodes completions without special tokens, so its format reward differs; rewards are
not what is compared here.

    PYTHONPATH=. python benchmarks/bench_grpo.py [--prompts 32] [--G 8] [--max-len 48] [--steps 3]
        [--threads 1] [--json]

The default step is the RL speedrun's (32 prompts x G=8). The ratio grows with the batch
(measured, README "Reinforcement learning": 2.5x at 4 prompts, 3.3x at 16, 3.5x at 32):
TRL's `generate` pads every completion to the longest and its update runs each prompt G
times, while a small batch leaves both sides bound by per-operator overhead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import emit, json_only_stdout, log
import nanoseek
from nanoseek.text.chat_template import render_chat
from nanoseek.data.tasks import load_task
from nanoseek.train.pretrain import setup_threads


def make_checkpoint(root: Path, init: str | None) -> Path:
    if init:
        return Path(init)
    from nanoseek.config import preset
    from nanoseek.data import default_corpus
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer
    torch.manual_seed(0)
    out = root / "init"
    nanoseek.save_pretrained(CausalLM(preset("tiny")).eval(), out)
    save_tokenizer(train_tokenizer(default_corpus()[:400], vocab_size=4096), out)
    return out


def nanoseek_steps(init: Path, root: Path, a) -> list[float]:
    from nanoseek.train.run.metrics import read_metrics
    from nanoseek.train.rl.config import RLConfig, rl_train_config
    from nanoseek.train.rl.run import rl
    cfg = RLConfig(init=str(init), task_options={"digits": 2},
                   train=rl_train_config(max_steps=a.steps + 1, batch_size=a.prompts, lr=1e-6,
                                         warmup_steps=0, eval_every=0, save_every=a.steps + 1),
                   num_generations=a.G, max_completion_length=a.max_len, beta=a.beta, eval_n=1)
    rl(root / "nanoseek", cfg, progress=False, log=log)
    recs = [r for r in read_metrics(root / "nanoseek") if r["kind"] == "train"]
    return [r["rollout_s"] + r["update_s"] for r in recs][1:]


def trl_steps(init: Path, root: Path, a) -> list[float]:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    task = load_task("arithmetic", digits=2)
    examples = task.examples("train", a.prompts * (a.steps + 1), seed=0)
    data = Dataset.from_list([{"prompt": render_chat(task.prompt_messages(ex), add_generation_prompt=True),
                               "answer": ex.answer} for ex in examples])

    def reward(prompts, completions, answer, **kw):
        from nanoseek.data.tasks.rewards import numeric_accuracy
        return [numeric_accuracy(c, ans) for c, ans in zip(completions, answer)]

    model = load_hf(init, transformers)
    tok = transformers.AutoTokenizer.from_pretrained(str(init))
    args = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=a.prompts * a.G,
                      num_generations=a.G, max_completion_length=a.max_len, beta=a.beta,
                      learning_rate=1e-6, max_steps=a.steps + 1, logging_steps=1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", temperature=1.0,
                      loss_type="grpo", scale_rewards="group", shuffle_dataset=False,
                      disable_tqdm=True)
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return times[1:]


def load_hf(init: Path, transformers):
    for impl in ("eager", "grouped_mm"):  # eager is the faster on CPU (bench_train.py)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(init), experts_implementation=impl, dtype=torch.float32)
            log(f"transformers experts_implementation={impl}")
            return model
        except Exception as e:  # an implementation this build does not offer
            log(f"experts_implementation={impl}: unavailable ({type(e).__name__})")
    raise RuntimeError("transformers could not load the checkpoint")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", help="checkpoint to start from (default: a random tiny-preset model)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (the RL speedrun's 32)")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-len", type=int, default=48, help="max completion tokens")
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after a warm-up)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (0 = every core; 1 suits a shared machine)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = json_only_stdout(a.json)
    setup_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init = make_checkpoint(root, a.init)
        ours = statistics.median(nanoseek_steps(init, root, a))
        log(f"nanoseek: {ours:.2f} s/step")
        theirs = statistics.median(trl_steps(init, root, a))
        log(f"TRL GRPOTrainer: {theirs:.2f} s/step")
    res = {"ratio": theirs / ours, "nanoseek_steps_per_min": 60 / ours, "trl_steps_per_min": 60 / theirs,
           "prompts": a.prompts, "G": a.G, "max_len": a.max_len, "steps": a.steps, "threads": torch.get_num_threads()}
    emit(res, a.json, out, settings=vars(a))


if __name__ == "__main__":
    main()
