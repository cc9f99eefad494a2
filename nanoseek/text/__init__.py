"""The text vocabulary: the byte-level BPE tokenizer, DeepSeek's special tokens and its
chat template (the format every stage, the engine and the server speak)."""
