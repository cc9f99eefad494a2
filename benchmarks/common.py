"""What the benchmarks share: transformers loaded with each experts implementation it offers,
so every comparison is against transformers' fastest option, not its default."""

from __future__ import annotations

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def transformers_variants(path, train: bool):
    """Yield (experts_implementation, DeepseekV3ForCausalLM) for each implementation this
    transformers build offers, loaded from the checkpoint directory `path`."""
    import transformers
    for impl in EXPERTS_IMPLEMENTATIONS:
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl)
        except Exception as e:  # an implementation this build does not offer
            print(f"transformers experts_implementation={impl}: unavailable ({type(e).__name__})")
            continue
        yield impl, hf.train(train)
