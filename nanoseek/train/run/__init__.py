"""A run directory: whose it is (run_dir), one process at a time (run_lock), its settings
(run.json), metrics.jsonl, Ctrl-C/SIGTERM (signals), the resumable state of a one-process
run (train_state.pt); a sharded run's state is parallel/sharded_state.py's."""
