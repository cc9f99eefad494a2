"""Whether k-major linear weights pay on this CPU (engine/weight_layout.py): one F.linear per
weight shape and row count, in the layout nn.Linear loads ([out, in], rows contiguous) and
k-major (the same [out, in] tensor stored [in, out]), side by side in one process, and what
the engine's "auto" picks for the same shapes.

The default shapes are bench_engine_vl.py's MLA language model (hidden 256, 4 heads, q-LoRA
128, latent 64 + rope 16, experts of 128, a dense FFN of 512); --shapes takes others (OUTxIN).
Rows: a decode step's batch (1 to 64) and a prefill chunk (1536). Last line: `decode_ratio=...`
(as-loaded time / k-major time, summed over the decode rows and shapes) `prefill_ratio=...`
`auto=...`.
"""

from __future__ import annotations

import argparse

import torch

from nanoseek.engine import weight_layout

SHAPES = ["128x256", "192x128", "80x256", "256x64", "256x128", "512x256", "256x512"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="weight shapes OUTxIN")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16, 64], help="decode rows")
    ap.add_argument("--prefill-rows", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    sums = {"decode": [0.0, 0.0], "prefill": [0.0, 0.0]}
    print(f"{'weight':>9} {'rows':>5} {'as-loaded us':>13} {'k-major us':>11} {'ratio':>6}")
    for out_f, in_f in shapes:
        for rows in [*args.rows, args.prefill_rows]:
            a, b = weight_layout.time_shape((out_f, in_f), rows, dtype, max(3, args.repeats * 16 // max(rows, 16)))
            kind = sums["prefill" if rows == args.prefill_rows else "decode"]
            kind[0] += a
            kind[1] += b
            print(f"{out_f:>4}x{in_f:<4} {rows:>5} {a * 1e6:>13.1f} {b * 1e6:>11.1f} {a / b:>6.2f}")
    model = torch.nn.Sequential(*[torch.nn.Linear(i, o, bias=False).to(dtype) for o, i in shapes])
    auto = weight_layout.apply_weight_layout(model, "auto")
    print(f"decode_ratio={sums['decode'][0] / sums['decode'][1]:.2f} "
          f"prefill_ratio={sums['prefill'][0] / sums['prefill'][1]:.2f} auto={auto}")


if __name__ == "__main__":
    main()
