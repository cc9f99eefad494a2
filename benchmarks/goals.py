"""What each benchmark's headline figure is meant to reach, so the results page can say
"met" or "not met" beside the figure instead of leaving the reader to remember the target.

A goal is (result key, comparison, threshold, what it means). The thresholds are the ones
the project set when each benchmark was written (docs/log.md keeps the earlier runs against
them); a benchmark without a goal (a scaling or precision study) reports figures only.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

OPERATORS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


@dataclass(frozen=True)
class Goal:
    key: str
    op: str
    threshold: float
    meaning: str

    def met(self, value) -> bool | None:
        """None when the run has no such figure (e.g. MTP figures of a model without MTP)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return OPERATORS[self.op](value, self.threshold)


GOALS: dict[str, tuple[Goal, ...]] = {
    "bench_model": (
        Goal("ratio", ">=", 1.5, "forward + backward tokens/s over transformers' fastest"),
        Goal("ratio_v32", ">=", 1.5, "V3.2 (tiny-v32) forward + backward tokens/s over transformers' fastest"),
        Goal("ratio_v4", ">=", 1.5, "V4 (tiny-v4) forward + backward tokens/s over transformers' fastest"),
    ),
    "bench_memory_v4": (Goal("ratio", ">=", 1.0,
                             "transformers' peak RSS over nanoseek's, a 4k-token tiny-v4 forward"),),
    "bench_train": (Goal("ratio", ">=", 1.5, "full training step tokens/s over transformers' fastest"),),
    "bench_engine": (
        Goal("ratio", ">=", 4.0, "engine output tokens/s over transformers' best `generate`"),
        Goal("ratio_v32", ">=", 3.0, "V3.2: engine output tokens/s over DeepseekV32ForCausalLM's best `generate`"),
        Goal("ratio_v4", ">=", 3.0, "V4: engine output tokens/s over DeepseekV4ForCausalLM's best `generate` "
             "(its left-padded batches change the outputs: `ratio_v4_same_outputs` compares with its unpadded run)"),
        Goal("mtp_speedup", ">=", 1.0, "MTP speculation at 64 concurrent requests costs nothing"),
        Goal("mtp_speedup_one_stream", ">=", 1.3, "MTP speculation speeds up one stream"),
        Goal("mtp_acceptance_always_draft", ">=", 0.8,
             "share of MTP drafts accepted, drafting always (a model of few `train_steps` repeats "
             "itself, which inflates it)"),
    ),
    "bench_long_context": (
        Goal("v4_vs_v3_decode_64k", ">=", 5.0,
             "V3's decode ms/token over V4's, one stream at a 64k-token context (tiny models)"),
        Goal("v4_vs_v3_kv_64k", ">=", 5.0,
             "V3's cache bytes over V4's, one stream at a 64k-token context (tiny models)"),
    ),
    "bench_grpo": (Goal("ratio", ">=", 3.0, "GRPO steps/min over TRL's GRPOTrainer"),),
    "bench_agent": (Goal("accuracy_with_tool", ">=", 0.9, "held-out products right with the calculator"),),
    "load_server": (
        Goal("ratio", ">=", 0.9, "server tokens/s over `LLM.generate` on the same load"),
        Goal("errors", "==", 0, "failed or broken streams"),
        Goal("blocks_leaked", "==", 0, "KV blocks held after every request ended"),
    ),
}
