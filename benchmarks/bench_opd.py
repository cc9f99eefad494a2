"""On-policy distillation (DeepSeek-V4's OPD) against off-policy distillation, at equal
training time, from two domain teachers into one student.

Teachers, from the existing pipeline: arithmetic (2-digit addition, the RL speedrun's
task) trained by SFT then GRPO (`--arith-teacher`, e.g. runs/speedrun-rl/grpo; else built
here with the RL speedrun's stages), and tool use (calculator calls, 2-digit addition)
trained by SFT on the task's traces (`--tool-teacher`; else built here, from
`--tool-init`: from the pretrained checkpoint, 9 minutes of SFT on this loaded machine
learned the format but not to copy the numbers, 0 % held out). The student
starts from the pretrained checkpoint the teachers came from (`--pretrained`, default
runs/speedrun; else a short pretraining here; any checkpoint, e.g. an SFT student).

Then, for `--minutes` of training each (the loop's time limit, rollouts included; by
default each run's own CPU seconds, `--clock cpu`, so that a busy machine does not shorten
one arm; `--side-by-side` trains the arms at once, one process each):
  OPD          `nanoseek distill`: the first `--cold-start-steps` steps learn from the
               teachers' samples (a pretrained student never samples their format, and
               reverse KL barely moves a token the student does not sample), then the
               student samples and the prompt's teacher scores every token with the
               full-vocabulary reverse KL (train/rl/opd.py);
  off-policy   the same loop with `samples_from="teacher"` at every step: each teacher
               samples its task's prompts, the student is trained by SFT on those samples;
  off-policy late  the same on OPD's rates (`--lr` for the cold start's steps, then
               `--on-policy-lr`, from that checkpoint): whether OPD's gain is the objective's
               or the lower rate's.
Held-out greedy accuracy (the same problems for every model) of both teachers, the
starting student and both students, on both tasks. Last line:
    student_vs_teacher_min=<min over tasks of OPD student acc / teacher acc>
    opd_vs_offpolicy=<OPD student's mean accuracy / the better off-policy student's>

    PYTHONPATH=. python benchmarks/bench_opd.py [--arith-teacher runs/speedrun-rl/grpo]
        [--tool-teacher DIR] [--pretrained runs/speedrun] [--minutes 40] [--batch-size 64]
        [--generations 1] [--cold-start-steps 230] [--on-policy-lr 2e-4] [--side-by-side]
        [--eval-n 100] [--out DIR] [--arms opd,offpolicy,offpolicy_late]

`--arms opd --out DIR` trains only the OPD student and reads the others from DIR (where an
earlier or a concurrent run trains them): another OPD setting against the same baselines,
without training them again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import log

ARITH = dict(digits=2, ops="+")  # the RL speedrun's task (recipes/speedrun_rl.RL_TASK)
TOOL = dict(digits=2, ops="+")
MAX_LEN = 64                     # tokens per completion (per turn for tool use)


def pretrained(args, work: Path) -> Path:
    if args.pretrained:
        return Path(args.pretrained)
    if Path("runs/speedrun/config.json").exists():
        return Path("runs/speedrun")
    from nanoseek.recipes.speedrun import speedrun
    log("pretraining (3 minutes) ...")
    speedrun("pretrain", work, minutes=3.0, progress=False)
    return work / "pretrain"


def arith_teacher(args, base: Path, work: Path) -> Path:
    if args.arith_teacher:
        return Path(args.arith_teacher)
    from nanoseek.recipes.speedrun_rl import grpo_stage, sft_stage
    log("arithmetic teacher: SFT to 30 % then GRPO ...")
    sft_stage(base, work / "arith_sft", 0.3, 8.0, 200, log)
    grpo_stage(work / "arith_sft", work / "arith_grpo", 60, 6.0, 200)
    return work / "arith_grpo"


def tool_teacher(args, base: Path, work: Path) -> Path:
    if args.tool_teacher:
        return Path(args.tool_teacher)
    from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
    log("tool-use teacher: SFT on the task's traces ...")
    init = Path(args.tool_init) if args.tool_init else base
    cfg = SFTConfig(init=str(init), task="tool_use", task_options=dict(TOOL), task_examples=4000,
                    epochs=100.0, eval_task_n=50, stop_at_accuracy=0.95,
                    train=sft_train_config(max_steps=2000, batch_size=16, seq_len=256, lr=2e-3,
                                           warmup_steps=20, schedule="constant", eval_every=20,
                                           save_every=0, time_limit=args.tool_minutes * 60))
    sft(work / "tool_sft", cfg, progress=False, log=lambda *a: None)
    return work / "tool_sft"


def accuracy(model_dir: Path, task: str, options: dict, n: int) -> float:
    from nanoseek.data.tasks import load_task
    from nanoseek.train.eval import evaluate_task
    return evaluate_task(str(model_dir), load_task(task, **options), n=n, k=0, max_tokens=MAX_LEN,
                         seed=0, split="test")["accuracy"]


def distil(student: Path, teachers: list[Path], out: Path, samples_from: str, args,
           minutes: float | None = None, max_steps: int = 100_000, lr: float | None = None,
           warmup_steps: int = 5) -> dict:
    from nanoseek.train.rl.config import rl_train_config
    from nanoseek.train.rl.distill import distill
    from nanoseek.train.rl.distill_config import DistillConfig
    cfg = DistillConfig(init=str(student), teachers=[str(t) for t in teachers],
                        tasks=["arithmetic", "tool_use"], tasks_options=[dict(ARITH), dict(TOOL)],
                        samples_from=samples_from, num_generations=args.generations,
                        eval_n=args.eval_n, max_completion_length=MAX_LEN,
                        cold_start_steps=args.cold_start_steps if samples_from == "student" else 0,
                        on_policy_lr=args.on_policy_lr if samples_from == "student" else None,
                        train=rl_train_config(max_steps=max_steps, batch_size=args.batch_size,
                                              lr=lr or args.lr, warmup_steps=warmup_steps,
                                              eval_every=args.eval_every, save_every=100_000,
                                              time_limit=(minutes or args.minutes) * 60,
                                              clock=args.clock, seed=args.seed))
    t0 = time.perf_counter()
    run = distill(out, cfg, progress=False, log=log)
    run["wall_s"] = time.perf_counter() - t0
    return run


def offpolicy_late(student: Path, teachers: list[Path], out: Path, args) -> dict:
    """The off-policy student on OPD's rates: `--cold-start-steps` steps at --lr (the OPD
    run's cold start, step for step), then, from that checkpoint, off-policy steps at
    --on-policy-lr for the rest of the budget (Adam's moments start afresh there, no warm-up).
    Whether OPD's gain is the objective's or the lower rate's."""
    if not args.on_policy_lr or args.cold_start_steps < 1:
        raise SystemExit("--arms offpolicy_late needs --on-policy-lr (the rate it drops to) and "
                         "--cold-start-steps >= 1 (when it drops)")
    first = distil(student, teachers, out / "cold", "teacher", args, max_steps=args.cold_start_steps)
    left = args.minutes - first["summary"]["elapsed"] / 60
    run = distil(out / "cold", teachers, out / "late", "teacher", args, minutes=max(left, 1 / 60),
                 lr=args.on_policy_lr, warmup_steps=0)
    run["summary"]["steps"] += first["summary"]["steps"]
    run["start_eval"] = first["start_eval"]
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    return run


def _threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def _arm(a: tuple) -> dict:
    return offpolicy_late(*a[:3], a[4]) if a[3] == "teacher_late" else distil(*a)


ARMS = ("opd", "offpolicy", "offpolicy_late")


def train_arms(args, base: Path, teachers: list[Path], work: Path) -> dict:
    """run.json of each student: the arms in --arms trained here, the others read from --out
    where an earlier (or a concurrent) run finished them; an arm found nowhere is left out,
    except OPD and the plain off-policy student, which the last line needs."""
    sampler = {"opd": "student", "offpolicy": "teacher", "offpolicy_late": "teacher_late"}
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(wanted) - set(ARMS):
        raise SystemExit(f"--arms {args.arms!r}: name some of {', '.join(ARMS)}")
    todo = [(base, teachers, work / name, sampler[name], args) for name in wanted]
    if args.side_by_side and len(todo) > 1:  # processes at once: all see the same load
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(len(todo), mp_context=mp.get_context("spawn"), initializer=_threads,
                                 initargs=(args.threads,)) as pool:
            done = list(pool.map(_arm, todo))
    else:
        done = [_arm(a) for a in todo]
    runs = dict(zip(wanted, done))
    for name in set(ARMS) - set(wanted):  # read after training: another process may write it
        found = work / name / "run.json"
        run = json.loads(found.read_text()) if found.is_file() else {}
        if run.get("final_eval"):
            runs[name] = run
        elif name != "offpolicy_late":
            raise SystemExit(f"--arms {args.arms!r} skips {name}, and {found} holds no finished run")
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained")
    p.add_argument("--arith-teacher")
    p.add_argument("--tool-teacher")
    p.add_argument("--tool-minutes", type=float, default=6.0)
    p.add_argument("--tool-init", help="the tool-use teacher's SFT starts here (default: the "
                   "pretrained checkpoint; e.g. runs/speedrun-rl/sft, which already reads the numbers)")
    p.add_argument("--minutes", type=float, default=40.0, help="training time of each student")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per step (half per task)")
    p.add_argument("--generations", type=int, default=1, help="completions per prompt")
    p.add_argument("--cold-start-steps", type=int, default=230,
                   help="OPD's first steps on the teachers' samples (DistillConfig.cold_start_steps)")
    p.add_argument("--on-policy-lr", type=float, default=2e-4,
                   help="OPD's rate once the student samples (DistillConfig.on_policy_lr)")
    p.add_argument("--arms", default="opd,offpolicy,offpolicy_late",
                   help="which students to train: opd, offpolicy (SFT on the teachers' samples at "
                   "--lr), offpolicy_late (the same on OPD's rates: --lr for the cold start's "
                   "steps, then --on-policy-lr); the others' results are read from --out once these "
                   "are trained (an earlier or a concurrent run's)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="what --minutes counts: each run's own CPU seconds (equal budgets on a "
                   "shared machine; with --threads 1 the same as wall time when idle) or wall time")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluations every N steps")
    p.add_argument("--side-by-side", action="store_true",
                   help="train the two students at once, one process each (same load on both)")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a shared machine's spinning OpenMP threads cost more)")
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_opd_"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"loadavg at start: {open('/proc/loadavg').read().strip()}")
    base = pretrained(args, work)
    teachers = [arith_teacher(args, base, work), tool_teacher(args, base, work)]
    tasks = [("arithmetic", ARITH), ("tool_use", TOOL)]
    teacher_acc = {t: accuracy(d, t, o, args.eval_n) for d, (t, o) in zip(teachers, tasks)}
    log(f"teachers' held-out accuracy: {teacher_acc}")
    runs = train_arms(args, base, teachers, work)
    acc = {name: {t: run["final_eval"][f"accuracy_{t}"] for t, _ in tasks} for name, run in runs.items()}
    acc["student_start"] = {t: runs["opd"]["start_eval"][f"accuracy_{t}"] for t, _ in tasks}
    acc["teacher"] = teacher_acc
    steps = {name: run["summary"]["steps"] for name, run in runs.items()}
    log(f"{'held-out greedy accuracy':<26}" + "".join(f"{t:>12}" for t, _ in tasks))
    for name in ("teacher", "student_start", *[a for a in ARMS if a in runs]):
        log(f"{name:<26}" + "".join(f"{acc[name][t]:>12.3f}" for t, _ in tasks))
    log(f"steps in {args.minutes} min: {steps}; loadavg at end: {open('/proc/loadavg').read().strip()}")
    ratios = [acc["opd"][t] / teacher_acc[t] for t, _ in tasks if teacher_acc[t] > 0]
    ratio = min(ratios) if len(ratios) == len(tasks) else float("nan")  # a teacher at 0: undefined
    mean = {k: sum(acc[k].values()) / len(tasks) for k in runs}
    best_off = max(mean[k] for k in runs if k != "opd")  # the stronger off-policy student
    vs = (mean["opd"] / best_off if best_off
          else float("nan") if not mean["opd"] else float("inf"))  # 0 / 0: undefined
    (work / "bench_opd.json").write_text(json.dumps({"accuracy": acc, "steps": steps,
                                                     "minutes": args.minutes}, indent=1))
    print(f"student_vs_teacher_min={ratio:.3f} opd_vs_offpolicy={vs:.3f}")


if __name__ == "__main__":
    main()
