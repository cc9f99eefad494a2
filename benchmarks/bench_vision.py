"""Seeing: a tiny DeepSeek-VL (the `tiny-vl` SigLIP tower and aligner around the pretraining
speedrun's MLA language model) trained on rendered arithmetic, then asked held-out pictures'
results through the agent and its calculator, and bare.

    python benchmarks/bench_vision.py --out runs/bench-vision   # 45 + 25 minutes of training

1. `train`: `load_task("rendered_arithmetic", target="tool", ...)`: two 2-digit numbers and
   an operator drawn with PIL (faces, sizes and noise; `--style varied` adds slant, colours,
   lines, blur and any place), the demonstration reading the picture into a calculator call
   (`<think> The image shows 47 + 38. </think>` + calculator({"expression": "47 + 38"}), the
   tool's output, `<answer>85</answer>`). `nanoseek.train.posttrain.sft` with `vision="tiny-vl"`
   builds the VL model on --init; its fresh tower first learns to read the task's training
   pictures alone for --tower-minutes (train/posttrain/tower_reading.py: a transcription head
   on the tower, the stand-in for DeepSeek-VL's pretrained SigLIP; a worker process draws the
   pictures on one core, the tower trains on the others), then the aligner and the language
   model are SFT'd for --minutes on every core with the tower frozen (--train-vision: trained
   too).
2. The test split's pictures (problems and renderings never trained on) are asked through
   nanoseek's server and `nanoseek.agent.Agent` with the calculator, the picture sent as
   `nanoseek agent --image` sends it: `agent_accuracy` (the final answer is the result),
   `read_accuracy` (the first call's expression is the picture's, exactly: `38 + 47` for
   47 + 38 is a misreading). `bare_accuracy`: the same model and pictures, no tool offered,
   the prompt ending in `<answer>`, the result written directly (greedy, in process).
   `image_feature_spread`: how much the image rows the language model receives differ between
   the test pictures, as a fraction of their size (`feature_spread`); near 0 the rows are the
   same for every picture and nothing can be read from them.
3. `--target reading` trains the transcription alone (`<answer>47 + 38</answer>`) and scores
   read_accuracy on it; no agent, agent_accuracy and bare_accuracy are not measured.

The last line: `read_accuracy=… agent_accuracy=… bare_accuracy=… n=… steps=… style=…
tower_read=… image_feature_spread=…` (tower_read: the tower's reading head on held-out
training-split pictures, whole transcriptions, after its stage).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK_OPTIONS = {"digits": 2, "ops": "+-*", "image_size": [96, 64]}
BARE_PROMPT = "Compute what the image shows. Give the result in <answer></answer>."
BARE_SYSTEM = "Answer with the exact result."
SEQ_LEN = {"reading": 160, "tool": 176}  # reading: two conversations a window; tool: one


def task_of(args):
    from nanoseek.data.tasks import load_task
    return load_task("rendered_arithmetic", **TASK_OPTIONS, target=args.target, style=args.style)


def train(args) -> dict:
    """The tower's reading stage, then SFT, into --out; returns run.json's content."""
    from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
    out = Path(args.out)
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    config = SFTConfig(
        init=str(args.init), task="rendered_arithmetic", task_examples=args.train_examples,
        task_options={**TASK_OPTIONS, "target": args.target, "style": args.style}, vision="tiny-vl",
        train_vision=args.train_vision, tower_reading_minutes=args.tower_minutes,
        epochs=1000.0,  # the clock ends the run
        train=sft_train_config(max_steps=args.max_steps, batch_size=args.batch_size, seq_len=args.seq_len or SEQ_LEN[args.target],
                               lr=args.lr, warmup_steps=20, time_limit=args.minutes * 60,
                               save_every=100000, seed=args.seed))
    return sft(out, config, resume=args.resume, progress=False, log=lambda *a: print(*a, flush=True))


def encoded_prompt(messages, model, tok, tail: str = "") -> list[int]:
    """Prompt ids (one placeholder run per picture, as the server and engine write it), then
    `tail` as plain text (the bare prompt's `<answer>`)."""
    from nanoseek.model.vl.vl_layout import expand_image_placeholders
    from nanoseek.text.chat_template import Part, chat_parts
    from nanoseek.text.tokenizer import Tokenizer
    cfg = model.config
    parts = chat_parts(messages, True, cfg.image_token_id) + ([Part(tail, False)] if tail else [])
    one = Tokenizer.of(tok).encode_parts(parts)[0]
    return expand_image_placeholders(one, cfg.image_token_id, cfg.image_tokens)


def pixels_of(examples, model, task):
    from nanoseek.model.vl.vl_image import image_processor, preprocess
    return preprocess([task.image(ex) for ex in examples], image_processor(None, model.config.vision.image_size),
                      max_images=len(examples))


def feature_spread(model, pixel_values) -> float:
    """Mean distance of each picture's image rows (aligner outputs) from their mean over the
    pictures, over the rows' mean norm: ~0.1 for the random tower on 96 x 64 pictures; a
    tower and aligner trained into one constant "soft prompt" for every picture give ~0."""
    import torch
    with torch.no_grad():
        f = model.encode_images(pixel_values).float()
    return float((f - f.mean(0)).norm(dim=-1).mean() / f.norm(dim=-1).mean().clamp(min=1e-12))


def greedy(model, tok, task, examples, prompts, max_new_tokens: int, batch: int = 50) -> list[str]:
    """Greedy completions of equal-length prompts with their pictures, in process."""
    import torch
    texts = []
    for s in range(0, len(examples), batch):
        ids = torch.tensor(prompts[s:s + batch])
        out = model.generate(ids, pixels_of(examples[s:s + batch], model, task), max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id)
        texts += [tok.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:].tolist()]
    return texts


def same_lengths(prompts) -> list[list[int]]:
    if len({len(x) for x in prompts}) != 1:
        raise SystemExit("test prompts differ in length; batch them one by one")
    return prompts


def read_accuracy(run_dir: Path, args) -> dict:
    """--target reading: greedy transcriptions of the held-out pictures, exact match."""
    from nanoseek.data.tasks.rendered_arithmetic import read_accuracy as score
    model, tok = load(run_dir)
    task = task_of(args)
    examples = task.examples("test", args.test_n, args.seed)
    prompts = same_lengths([encoded_prompt(task.prompt_messages(ex), model, tok) for ex in examples])
    texts = greedy(model, tok, task, examples, prompts, task.max_tokens)
    right = [score(t, ex.answer) == 1.0 for t, ex in zip(texts, examples)]
    return {"read_accuracy": sum(right) / len(examples), "n": len(examples),
            "image_feature_spread": round(feature_spread(model, pixels_of(examples[:50], model, task)), 4),
            "misreadings": [{"shows": ex.answer, "read": t} for t, ex, ok in zip(texts, examples, right)
                            if not ok][:8]}


def load(run_dir: Path):
    from nanoseek.model.vl import DeepseekVLForConditionalGeneration
    from nanoseek.text.tokenizer import load_tokenizer
    return DeepseekVLForConditionalGeneration.from_pretrained(run_dir).eval(), load_tokenizer(run_dir)


def with_tool(url: str, task, ex) -> dict:
    """One agent run over the server: the instruction and the picture, the calculator."""
    from nanoseek.agent import Agent, Guards
    from nanoseek.agent.images import read_image
    from nanoseek.agent.tools.calculator import calculator_tool
    from nanoseek.data.tasks.rewards import numeric_accuracy
    from nanoseek.text.images import ImageLimits
    picture = read_image(task.prompt_messages(ex)[1]["content"][1]["image_url"]["url"], 0, ImageLimits())
    agent = Agent(url, "vl", [calculator_tool()], mode="native", system=task.system, echo=None,
                  guards=Guards(max_steps=3), max_tokens=task.max_tokens, extra_body={"skip_special_tokens": False})
    traj = agent.run(ex.prompt, images=[picture])
    first = expression_of(traj.of_type("call")[0]["arguments"]) if traj.of_type("call") else None
    return {"right": numeric_accuracy(traj.answer or "", ex.answer) == 1.0, "call": first,
            "read": first is not None and first.split() == ex.meta["reading"].split(),
            "answer": traj.answer, "saw": [e.get("images") for e in traj.of_type("see")]}


def expression_of(arguments) -> str | None:
    """The calculator call's expression (arguments as OpenAI sends them: a JSON string)."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return None
    return str(args.get("expression")) if isinstance(args, dict) and "expression" in args else None


def bare(model, tok, task, examples) -> list[bool]:
    """The result written directly: no tool offered, the prompt ends in <answer>."""
    messages = [[{"role": "system", "content": BARE_SYSTEM},
                 {"role": "user", "content": [{"type": "text", "text": BARE_PROMPT},
                                              task.prompt_messages(ex)[1]["content"][1]]}] for ex in examples]
    prompts = same_lengths([encoded_prompt(m, model, tok, "<answer>") for m in messages])
    texts = greedy(model, tok, task, examples, prompts, 8)
    return [bool(m) and m.group(1) == ex.answer
            for m, ex in zip((re.match(r"\s*(-?\d+)", t) for t in texts), examples)]


def agent_accuracy(run_dir: Path, args) -> dict:
    """--target tool: the agent with its calculator over nanoseek's server, and bare."""
    from benchmarks.bench_agent import Served
    task = task_of(args)
    examples = task.examples("test", args.test_n, args.seed)
    for ex in examples:
        ex.meta["reading"] = f"{ex.meta['a']} {ex.meta['op']} {ex.meta['b']}"
    served = Served(run_dir, name="vl")
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            runs = list(pool.map(lambda ex: with_tool(served.url, task, ex), examples))
    finally:
        served.close()
    model, tok = load(run_dir)
    plain = bare(model, tok, task, examples)
    n = len(examples)
    return {"read_accuracy": sum(r["read"] for r in runs) / n, "agent_accuracy": sum(r["right"] for r in runs) / n,
            "bare_accuracy": sum(plain) / n, "n": n, "called_tool": sum(r["call"] is not None for r in runs) / n,
            "saw_image": sum(bool(r["saw"]) for r in runs) / n,
            "image_feature_spread": round(feature_spread(model, pixels_of(examples[:50], model, task)), 4),
            "misreadings": [{"shows": ex.meta["reading"], "called": r["call"], "answer": r["answer"]}
                            for r, ex in zip(runs, examples) if not r["read"]][:8]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="runs/speedrun", help="text checkpoint + tokenizer (an MLA model)")
    p.add_argument("--out", default="runs/bench-vision", help="run directory of the VLM")
    p.add_argument("--target", choices=("tool", "reading"), default="tool",
                   help="tool: read the picture into a calculator call, scored through the agent "
                   "(default); reading: the transcription alone")
    p.add_argument("--tower-minutes", type=float, default=45.0,
                   help="the tower's reading stage before SFT (0: none; the tower stays random)")
    p.add_argument("--minutes", type=float, default=25.0, help="SFT time")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--train-examples", type=int, default=20000,
                   help="SFT pictures (under two passes over them in the default minutes on 2 cores: a "
                   "model reads the pictures it trained on better than new ones)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=0,
                   help="SFT window (0: 176 for tool, one conversation with runs/speedrun's tokenizer; 160 "
                   "for reading, two)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-vision", action="store_true",
                   help="train the tower in SFT too (default: frozen after its reading stage)")
    p.add_argument("--style", choices=("varied", "plain"), default="plain",
                   help="the pictures (rendered_arithmetic's style): plain (faces, sizes and noise vary; "
                   "black on white near the centre; the default) or varied (also colours, slant, lines, "
                   "blur, anywhere)")
    p.add_argument("--test-n", type=int, default=400, help="held-out pictures asked")
    p.add_argument("--concurrency", type=int, default=8, help="agents run at once")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--skip-train", action="store_true", help="score --out as it is")
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    run = json.loads((Path(args.out) / "run.json").read_text()) if args.skip_train else train(args)
    t1 = time.time()
    score = agent_accuracy if args.target == "tool" else read_accuracy
    result = score(Path(args.out), args)
    tower = (run.get("tower_reading") or {}).get("after", {}).get("exact")
    result.update(steps=run["summary"]["steps"], tower_reading=run.get("tower_reading"),
                  train_seconds=round(t1 - t0, 1), eval_seconds=round(time.time() - t1, 1),
                  threads=torch.get_num_threads(), trainable_parameters=run.get("trainable_parameters"),
                  loss_before=run.get("loss_before"), loss_after=run.get("loss_after"))
    print(json.dumps(result, indent=1))
    fmt = {k: "n/a" if result.get(k) is None else f"{result[k]:.3f}"
           for k in ("read_accuracy", "agent_accuracy", "bare_accuracy")}
    print(f"read_accuracy={fmt['read_accuracy']} agent_accuracy={fmt['agent_accuracy']} "
          f"bare_accuracy={fmt['bare_accuracy']} n={result['n']} steps={result['steps']} style={args.style} "
          f"tower_read={'n/a' if tower is None else tower} image_feature_spread={result['image_feature_spread']:.4f}")
    return result


if __name__ == "__main__":
    main()
