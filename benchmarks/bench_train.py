"""A full training step (forward, backward, clipping, AdamW) of nanoseek against
transformers' DeepseekV3ForCausalLM: same config, same weights, same batch, one process.

transformers never trains MTP modules nor computes V3's balance loss, so both sides run
the same work: MTP off, balance loss off; nanoseek's step keeps its aux-loss-free router
bias update (part of its recipe; a few microseconds). transformers is timed with every
experts implementation it offers and the fastest is the baseline. The two models' steps
alternate round by round and the median step time of each is used, so that load from
other processes on a shared machine hits both alike.

MFU = model FLOPs per token (6 x activated matmul parameters + causal attention, from
nanoseek.calc via nanoseek/train/mfu.py) x tokens/s / this machine's measured matmul peak.

    python benchmarks/bench_train.py [--preset tiny] [--batch 8] [--seq 256] [--steps 6] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from common import emit, json_only_stdout, log, transformers_variants
import nanoseek
from nanoseek.config import preset
from nanoseek.model import CausalLM
from nanoseek.train.loop import param_groups
from nanoseek.train.mfu import flops_per_token, measure_peak_flops
from nanoseek.train.pretrain import setup_threads


def make_step(model, ids, is_hf: bool):
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))

    def step():
        if is_hf:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts itself
        else:
            loss = model.loss(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not is_hf:
            model.update_router_biases()
        return float(loss.detach())
    return step


def timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    out = json_only_stdout(args.json)

    threads = setup_threads()
    peak = measure_peak_flops("cpu")  # the whole machine's peak, whatever --threads says
    if args.threads:
        threads = args.threads
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    ours = CausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    fpt = flops_per_token(ours, args.seq)
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(ours, d)
        candidates = {}
        for impl, hf in transformers_variants(d, train=True):
            step = make_step(hf, ids, True)
            step()
            candidates[impl] = (min(timed(step) for _ in range(2)), hf, step)
            log(f"transformers [{impl}]: {tokens / candidates[impl][0]:,.0f} tok/s (screening)")
        best_impl = min(candidates, key=lambda k: candidates[k][0])
        hf, hf_step = candidates[best_impl][1], candidates[best_impl][2]
        candidates.clear()
    # both start from the same weights (transformers loaded nanoseek's checkpoint above); warm up
    our_step = make_step(ours, ids, False)
    for _ in range(args.warmup):
        our_step()
        hf_step()
    t_ours, t_hf = [], []
    for _ in range(args.steps):  # alternate so background load hits both alike
        t_ours.append(timed(our_step))
        t_hf.append(timed(hf_step))
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    results = {
        "ratio": m_hf / m_ours,
        "nanoseek_tok_s": tokens / m_ours,
        "transformers_tok_s": tokens / m_hf,
        "nanoseek_mfu": fpt * tokens / m_ours / peak,
        "transformers_mfu": fpt * tokens / m_hf / peak,
        "transformers_experts_impl": best_impl,
        "flops_per_token": fpt,
        "peak_gflops": peak / 1e9,
        "batch": args.batch, "seq": args.seq, "threads": threads,
    }
    emit(results, args.json, out)


if __name__ == "__main__":
    main()
