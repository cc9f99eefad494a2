"""Model weights on disk: Hugging Face safetensors both ways (hf.py), BF16 <-> FP8
conversion (convert.py) and the atomic writes every file of a run goes through (atomic.py).
It knows nothing of the model class: `CausalLM.from_pretrained` hands it in."""
