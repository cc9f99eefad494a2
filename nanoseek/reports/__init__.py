"""Report cards: a run's (run_report.py), RL runs' side by side (rl_report.py) and the
distributed-training section (distributed.py), read from run.json and metrics.jsonl."""
