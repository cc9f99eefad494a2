"""Seeing, the reading half: a tiny DeepSeek-VL (the `tiny-vl` SigLIP tower and aligner around
the pretraining speedrun's MLA language model) SFT'd by `nanoseek sft` on rendered arithmetic,
scored on held-out pictures by how often it transcribes them exactly.

    python benchmarks/bench_vision.py --minutes 8 --threads 1 --out runs/bench-vision

1. `train_reader`: `load_task("rendered_arithmetic", target="reading", ...)`: two 2-digit
   numbers and an operator drawn with PIL (faces, sizes, slant, colours, lines, blur,
   noise), the demonstration `<answer>47 + 38</answer>`; `nanoseek.train.posttrain.sft` with
   `vision="tiny-vl"` builds the VL model on --init and trains it for --minutes, the
   vision tower included (`train_vision`: the tower is freshly initialised, unlike
   DeepSeek-VL's pretrained SigLIP, so it must learn to see; --frozen-vision keeps it as
   built). Windows of 160 tokens hold two examples (76 tokens each, 36 of them the image).
2. `read_accuracy`: greedy transcriptions of the task's test split (problems and renderings
   never trained on: rendered_arithmetic keeps the split by problem and by rendering seed),
   exact match (`38 + 47` for 47 + 38 is wrong).
   `image_feature_spread`: how much the image rows the language model receives differ between
   the test pictures, as a fraction of their size (`feature_spread`); near 0 the rows are the
   same for every picture and nothing can be read from them.
3. The agent half (the model reads the picture, then calls its calculator) is a later part:
   `agent_accuracy` and `bare_accuracy` go on the same last line.

The last line: `read_accuracy=… n=… steps=… style=… image_feature_spread=…`. `--style plain`
draws the pictures black on white near the centre (faces, sizes and noise still vary).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK_OPTIONS = {"digits": 2, "ops": "+-*", "image_size": [96, 64], "target": "reading"}


def train_reader(args) -> dict:
    """SFT the tiny VLM on the reading task for --minutes; returns run.json's content."""
    from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
    out = Path(args.out)
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    config = SFTConfig(
        init=str(args.init), task="rendered_arithmetic", task_examples=args.train_examples,
        task_options={**TASK_OPTIONS, "style": args.style}, vision="tiny-vl", train_vision=args.train_vision,
        epochs=1000.0,  # the clock ends the run
        train=sft_train_config(max_steps=args.max_steps, batch_size=args.batch_size, seq_len=160,
                               lr=args.lr, warmup_steps=20, time_limit=args.minutes * 60,
                               save_every=100000, seed=args.seed))
    return sft(out, config, resume=args.resume, progress=False, log=lambda *a: print(*a, flush=True))


def read_prompts(task, examples, model, tok):
    """Prompt ids (one placeholder run per picture, as the server and engine write it) and
    pixel values of the test examples."""
    import torch

    from nanoseek.data.chat_images import ImageConversation, conversation_images
    from nanoseek.model.vl.vl_image import image_processor, preprocess
    from nanoseek.model.vl.vl_layout import expand_image_placeholders
    from nanoseek.text.chat_template import chat_parts
    from nanoseek.text.images import ImageLimits
    from nanoseek.text.tokenizer import Tokenizer
    cfg, enc = model.config, Tokenizer.of(tok)
    ids, pics = [], []
    for i, ex in enumerate(examples):
        messages = task.prompt_messages(ex)
        one = enc.encode_parts(chat_parts(messages, True, cfg.image_token_id))[0]
        ids.append(expand_image_placeholders(one, cfg.image_token_id, cfg.image_tokens))
        sources = conversation_images(ImageConversation(messages, f"test example {i}"), ImageLimits())
        pics += [src.load(ImageLimits()) for src in sources]  # checked sources -> pictures
    if len({len(x) for x in ids}) != 1:
        raise SystemExit("test prompts differ in length; batch them one by one")
    return torch.tensor(ids), preprocess(pics, image_processor(None, cfg.vision.image_size),
                                         max_images=len(pics))


def feature_spread(model, pixel_values) -> float:
    """Mean distance of each picture's image rows (aligner outputs) from their mean over the
    pictures, over the rows' mean norm: ~0.1 for the random tower on 96 x 64 pictures; a
    tower and aligner trained into one constant "soft prompt" for every picture give ~0."""
    import torch
    with torch.no_grad():
        f = model.encode_images(pixel_values).float()
    return float((f - f.mean(0)).norm(dim=-1).mean() / f.norm(dim=-1).mean().clamp(min=1e-12))


def read_accuracy(run_dir: Path, n: int, seed: int, batch: int = 50, style: str = "varied") -> dict:
    """Greedy transcriptions of n held-out pictures (of `style`), scored by exact match."""

    from nanoseek.data.tasks import load_task
    from nanoseek.data.tasks.rendered_arithmetic import read_accuracy as score
    from nanoseek.model.vl import DeepseekVLForConditionalGeneration
    from nanoseek.text.tokenizer import load_tokenizer
    task = load_task("rendered_arithmetic", **TASK_OPTIONS, style=style)
    model = DeepseekVLForConditionalGeneration.from_pretrained(run_dir).eval()
    tok = load_tokenizer(run_dir)
    examples = task.examples("test", n, seed)
    right, wrong, spread = 0, [], None
    for s in range(0, n, batch):
        part = examples[s:s + batch]
        ids, px = read_prompts(task, part, model, tok)
        spread = feature_spread(model, px) if spread is None else spread
        out = model.generate(ids, px, max_new_tokens=task.max_tokens, eos_token_id=tok.eos_token_id)
        for ex, row in zip(part, out[:, ids.shape[1]:].tolist()):
            text = tok.decode(row, skip_special_tokens=True)
            ok = score(text, ex.answer)
            right += int(ok)
            if not ok and len(wrong) < 8:
                wrong.append({"shows": ex.answer, "read": text})
    return {"read_accuracy": right / n, "n": n, "image_feature_spread": round(spread, 4),
            "misreadings": wrong}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="runs/speedrun", help="text checkpoint + tokenizer (an MLA model)")
    p.add_argument("--out", default="runs/bench-vision", help="run directory of the VLM")
    p.add_argument("--minutes", type=float, default=10.0, help="training time")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--train-examples", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--frozen-vision", dest="train_vision", action="store_false",
                   help="keep the SigLIP tower as built (random here: it has never seen an image)")
    p.add_argument("--style", choices=("varied", "plain"), default="varied",
                   help="the pictures (rendered_arithmetic's style): varied (faces, sizes, noise, "
                   "colours, slant, lines, blur, anywhere) or plain (faces, sizes and noise only; "
                   "black on white near the centre)")
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--skip-train", action="store_true", help="score --out as it is")
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    run = json.loads((Path(args.out) / "run.json").read_text()) if args.skip_train else train_reader(args)
    t1 = time.time()
    result = read_accuracy(Path(args.out), args.test_n, args.seed, style=args.style)
    result.update(steps=run["summary"]["steps"], train_seconds=round(t1 - t0, 1),
                  eval_seconds=round(time.time() - t1, 1), threads=torch.get_num_threads(),
                  trainable_parameters=run.get("trainable_parameters"),
                  loss_before=run.get("loss_before"), loss_after=run.get("loss_after"))
    print(json.dumps(result, indent=1))
    print(f"read_accuracy={result['read_accuracy']:.3f} n={result['n']} steps={result['steps']} style={args.style} "
          f"image_feature_spread={result['image_feature_spread']:.4f}")
    return result


if __name__ == "__main__":
    main()
