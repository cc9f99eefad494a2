"""FP4 quantisation-aware training of the routed experts (quant/fp4_qat.py) against quantising
after training, on the speedrun's pretraining of the `tiny` preset.

Per seed, two runs with the speedrun's recipe (same data, same steps): (a) plain, and (c)
with the experts fake-quantised to FP4 from `--from-frac` of the steps on. Every model is then
scored on the whole validation split in fp32 (train/eval.py, bits per byte):
  a  = run (a) as trained (fp32 weights);
  b  = run (a) with its routed experts quantised to FP4 after training (post-training);
  c  = run (c) with its experts in FP4 (what it was trained as), read back from the FP4
       checkpoint `nanoseek convert --quantization fp4-experts` writes of it (asserted equal
       to the fake-quantised model's logits);
  c_masters = run (c)'s fp32 masters without quantisation (for reference).
Goal (issue 28): c - a <= (b - a) / 3. The two runs of a seed train at once, one thread each.

Then, on the last seed's (c): bytes of the routed experts' weights stored as fp32, bf16 and
FP4 (packed codes + UE8M0 scales), and engine decode speed (LLM, greedy, no speculation)
from the fp32 checkpoint and from the FP4 one, interleaved in one process. The engine
dequantises FP4 experts when it loads them (checkpoint/hf.py), so both run the same fp32
kernels; the figure checks that nothing else differs.

    python benchmarks/bench_fp4_qat.py [--steps 380] [--from-frac 0.6] [--seeds 1337] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, json_only_stdout, log  # noqa: E402


def train(out: str, seed: int, steps: int, fp4_from: int | None, precision: str) -> dict:
    """One pretraining run with the speedrun's recipe (one thread); returns run.json."""
    from nanoseek.config import preset
    from nanoseek.recipes.speedrun import SPEEDRUN_BIAS_SPEED, SPEEDRUN_TRAIN
    from nanoseek.train.loop import TrainConfig
    from nanoseek.train.pretrain import PretrainConfig, pretrain
    tcfg = TrainConfig(**{**SPEEDRUN_TRAIN, "seed": seed, "max_steps": steps, "eval_every": 0,
                          "save_every": 0, "precision": precision, "fp4_experts_from": fp4_from})
    cfg = PretrainConfig(model=preset("tiny", bias_update_speed=SPEEDRUN_BIAS_SPEED), train=tcfg, sample_tokens=0)
    return pretrain(out, cfg, overwrite=True, progress=False, log=lambda *a: None, threads=1)


def scorer(run_dir: Path, seq_len: int):
    """fp32 validation bits per byte of a model, on run_dir's whole validation split."""
    from nanoseek.data.tokenized import TokenArrays
    from nanoseek.text.tokenizer import load_tokenizer, token_byte_lengths
    from nanoseek.train.eval import make_evaluate
    tok, data = load_tokenizer(run_dir), TokenArrays.open(run_dir / "data")

    def score(model) -> float:
        lengths = token_byte_lengths(tok) + [0] * (model.config.vocab_size - len(tok))
        with torch.no_grad():
            return make_evaluate(data, lengths, seq_len, None, torch.device("cpu"))(model.eval())["val_bpb"]
    return score


def evaluate_seed(root: Path, seed: int) -> dict:
    from nanoseek.checkpoint.convert import convert
    from nanoseek.model import CausalLM
    from nanoseek.quant.fp4_qat import set_fp4_experts
    run_a, run_c = root / f"plain-{seed}", root / f"qat-{seed}"
    score = scorer(run_a, 256)
    a_model = CausalLM.from_pretrained(run_a)
    res = {"a": score(a_model)}
    set_fp4_experts(a_model, True)
    res["b"] = score(a_model)
    c_model = CausalLM.from_pretrained(run_c)
    res["c_masters"] = score(c_model)
    set_fp4_experts(c_model, True)
    convert(run_c, root / f"qat-{seed}-fp4", "fp4-experts", "fp32", progress=False, overwrite=True)
    c_fp4 = CausalLM.from_pretrained(root / f"qat-{seed}-fp4")
    ids = torch.randint(3, 4000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(c_fp4.eval()(ids), c_model.eval()(ids)), "FP4 checkpoint != fake-quantised model"
    res["c"] = score(c_fp4)
    return res


def expert_bytes(fp4_dir: Path) -> dict:
    """Bytes of the routed experts' weights as the FP4 checkpoint stores them (codes + scales,
    from the safetensors headers) and as fp32 / bf16 would (2 codes per byte)."""
    import json
    fp4 = weights = 0
    for f in fp4_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, v in header.items():
            if name == "__metadata__" or not (".experts." in name and ".shared_experts." not in name):
                continue
            fp4 += v["data_offsets"][1] - v["data_offsets"][0]
            if v["dtype"] == "I8":
                weights += 2 * v["shape"][0] * v["shape"][1]
    return {"expert_weights": weights, "expert_bytes_fp32": 4 * weights, "expert_bytes_bf16": 2 * weights,
            "expert_bytes_fp4": fp4}


def decode_speed(fp32_dir: Path, fp4_dir: Path, prompts: int, max_tokens: int, rounds: int) -> dict:
    """Output tok/s of the engine from each checkpoint (fp32 weights, and FP4 experts read
    back): rounds interleaved, median per variant."""
    from nanoseek.engine import LLM, SamplingParams
    llms = {name: LLM(str(d), speculative=False, kv_cache_memory="256MiB", max_num_seqs=64)
            for name, d in (("fp32", fp32_dir), ("fp4_experts", fp4_dir))}
    texts = [f"def function_{i}(x):" for i in range(prompts)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    speeds: dict[str, list[float]] = {k: [] for k in llms}
    for name, llm in llms.items():
        llm.generate(texts[:2], params, use_tqdm=False)  # warm-up
    for _ in range(rounds):
        for name, llm in llms.items():
            llm.engine.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = llm.generate(texts, params, use_tqdm=False)
            speeds[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
    return {f"decode_tok_s_{k}": statistics.median(v) for k, v in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=380, help="steps per run (the speedrun's in bf16)")
    ap.add_argument("--from-frac", type=float, default=0.6, help="QAT from this fraction of the steps")
    ap.add_argument("--seeds", default="1337", help="comma-separated seeds")
    ap.add_argument("--precision", default="auto", help="training precision (the speedrun's: auto)")
    ap.add_argument("--out", default="runs/bench_fp4_qat", help="where the runs go")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = json_only_stdout(args.json)
    root = Path(args.out)
    fp4_from = round(args.from_frac * args.steps)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    res: dict = {"fp4_from": fp4_from}
    per_seed = []
    for seed in seeds:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(train, str(root / f"{kind}-{seed}"), seed, args.steps, start, args.precision)
                    for kind, start in (("plain", None), ("qat", fp4_from))]
            runs = [j.result() for j in jobs]
        speeds = ", ".join(f"{r['summary']['tok_s']:.0f}" for r in runs)
        log(f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s ({speeds} tok/s, {runs[0]['precision']})")
        r = evaluate_seed(root, seed)
        log(f"seed {seed}: " + " ".join(f"{k}={v:.4f}" for k, v in r.items()))
        per_seed.append(r)
        res.update({f"{k}_{seed}": v for k, v in r.items()})
    for k in ("a", "b", "c", "c_masters"):
        res[k] = statistics.mean(r[k] for r in per_seed)
    res["ptq_loss"], res["qat_loss"] = res["b"] - res["a"], res["c"] - res["a"]
    res["qat_over_ptq"] = res["qat_loss"] / res["ptq_loss"] if res["ptq_loss"] else float("nan")
    last = seeds[-1]
    res.update(expert_bytes(root / f"qat-{last}-fp4"))
    res.update(decode_speed(root / f"qat-{last}", root / f"qat-{last}-fp4", args.prompts, args.max_tokens,
                            args.rounds))
    emit(res, args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
