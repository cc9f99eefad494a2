"""benchmarks/bench_engine_vl.py: the engine against transformers' generate on image+text
requests, and --split's prefill / decode-step breakdown."""

import json
import subprocess
import sys

BENCH = "benchmarks/bench_engine_vl.py"
SMALL = ["--requests", "2", "--max-tokens", "3", "--repeats", "1", "--experts", "eager"]


def test_split_reports_both_sides_prefill_and_decode_step():
    r = subprocess.run([sys.executable, BENCH, *SMALL, "--split", "--json"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["outputs_equal"] == "2/2"
    assert set(result["split_ms"]) == {"nanoseek", "transformers"}
    for side in result["split_ms"].values():
        assert side["prefill"] > 0
    assert "decode step" in r.stderr


def test_split_without_fixed_lengths_is_refused_with_the_reason():
    r = subprocess.run([sys.executable, BENCH, *SMALL, "--split", "--outputs", "mixed"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "--split needs --outputs fixed" in r.stderr


def test_step_split_divides_the_extra_time_by_the_extra_tokens():
    sys.path.insert(0, "benchmarks")
    try:
        from bench_engine_vl import step_split
    finally:
        sys.path.remove("benchmarks")
    assert step_split(1.0, 0.2, 5) == (0.2, 0.2)
