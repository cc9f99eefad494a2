"""A byte-level BPE tokenizer with DeepSeek's special tokens and chat template.

Trained with Hugging Face `tokenizers` and saved as `tokenizer.json` +
`tokenizer_config.json`, so `transformers.AutoTokenizer.from_pretrained(run_dir)` loads it
beside the model. Digits are split one by one before BPE (`Digits(individual_digits=True)`),
as DeepSeek does, so that numbers are spelled the same way everywhere and arithmetic stays
learnable at tiny scale. Ids 0/1/2 are bos/eos/pad, matching the `tiny` preset.

Chats are encoded by `Tokenizer.encode_chat`: the template's markers as their ids, every
message's content as plain text (`Tokenizer.encode_text`), so a special-token string typed
in a message never becomes a special token (nanoseek/text/chat_template.py says why and where this
differs from transformers' `apply_chat_template`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from nanoseek.text.chat_template import CHAT_TEMPLATE, Part, chat_parts  # DeepSeek-V3's format
from nanoseek.text.special_tokens import (ASSISTANT, BOS, END_THINK, EOS, PAD, SPECIAL_TOKENS,  # noqa: F401
                                          THINK, TOOL_TOKENS, USER)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")

class TokenizerError(ValueError):
    """Tokenizer training input or files are unusable."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE on `texts`; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at "
                             f"least 256 bytes + {n_special} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted():
        for t in texts:
            if t:
                seen[0] += 1
                yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise TokenizerError("no text to train the tokenizer on (the corpus is empty)")
    # Like DeepSeek's tokenizer: encode() with special tokens prepends bos.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return wrap(tok)


def wrap(tok):
    """A `tokenizers.Tokenizer` -> PreTrainedTokenizerFast with the special tokens named."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:], clean_up_tokenization_spaces=False,
        model_max_length=1 << 30)
    fast.chat_template = CHAT_TEMPLATE
    for name, tid in (("bos", 0), ("eos", 1), ("pad", 2)):
        got = getattr(fast, f"{name}_token_id")
        assert got == tid, f"{name} token has id {got}, expected {tid}"
    return fast


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Write the tokenizer files into `out_dir`, each one atomically (a checkpoint
    directory must never hold half a tokenizer.json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, out_dir / f.name)
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved by `save_tokenizer` (a run or tokenizer directory)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise TokenizerError(f"{path}: no tokenizer.json (train one with `nanoseek tokenizer train`)")
    return AutoTokenizer.from_pretrained(str(path))


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files of `src` into `dst` (e.g. into a new checkpoint)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            tmp = dst / f".{name}.tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens): the denominator of
    bits per byte, which makes losses comparable across tokenizers."""
    byte_of = _bytes_to_unicode_inverse()
    special = set(tokenizer.all_special_ids)
    lengths = [0] * len(tokenizer)
    for piece, tid in tokenizer.get_vocab().items():
        if tid not in special and tid < len(lengths):
            lengths[tid] = len(piece) if all(ch in byte_of for ch in piece) else len(piece.encode())
    return lengths


def _bytes_to_unicode_inverse() -> dict[str, int]:
    """GPT-2's byte <-> printable-character map, inverted (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """The package's one tokenizer wrapper: what the engine (and the server and agent on top
    of it) need from a `tokenizer.json` — encode text, decode ids with special tokens
    skipped or kept. It holds a `tokenizers.Tokenizer` (the Rust object, fast enough to be
    called once per generated token); `Tokenizer.of` also takes a transformers tokenizer
    (e.g. `train_tokenizer`'s or `load_tokenizer`'s) and uses its backend."""

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def of(cls, tokenizer) -> "Tokenizer | None":
        """Wrap whatever a caller handed over: None, a Tokenizer, a transformers tokenizer
        (its `backend_tokenizer`) or a `tokenizers.Tokenizer`."""
        if tokenizer is None or isinstance(tokenizer, cls):
            return tokenizer
        return cls(getattr(tokenizer, "backend_tokenizer", tokenizer))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer | None":
        """The directory's tokenizer.json, or None when it has none (token-id checkpoints)."""
        file = Path(path) / "tokenizer.json"
        if not file.exists():
            return None
        from tokenizers import Tokenizer as HFTokenizer
        return cls(HFTokenizer.from_file(str(file)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Raw text, its special-token strings read as special tokens (a completion prompt
        may mean them); BOS added as the post-processor says unless `add_special_tokens`
        is False. A chat goes through `encode_chat` instead, which reads content as text.
        Through `encode_batch`: `encode` holds the GIL for the whole call (1.3 s on 1 MiB of
        text), `encode_batch` releases it, so a server tokenising in a worker thread keeps
        its event loop running."""
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        """`text` as plain text: a special-token string in it (`<｜User｜>` typed by a user) is
        spelled in ordinary tokens, never the marker's id. The same ids as `encode` for text
        that holds no such string."""
        return plain_text_tokenizer(self.tok).encode_batch([text], add_special_tokens=False)[0].ids

    def encode_parts(self, parts: Iterable[Part]) -> tuple[list[int], list[bool]]:
        """Ids of `chat_parts` and, per id, whether the assistant wrote it. Markers become
        their ids; the text between two markers is encoded as one plain-text string (as the
        tokenizer splits a rendered chat at its special tokens, so a chat whose content holds
        no special-token string gets the ids of its rendered text)."""
        ids: list[int] = []
        trained: list[bool] = []
        run: list[str] = []

        def flush(flag: bool) -> None:
            piece = self.encode_text("".join(run)) if run else []
            ids.extend(piece)
            trained.extend([flag] * len(piece))
            run.clear()

        last = False
        for part in parts:
            if part.marker or part.trained != last:
                flush(last)
            if part.marker:
                tid = part.token_id if part.token_id is not None else self.tok.token_to_id(part.text)
                piece = [tid] if tid is not None else self.encode_text(part.text)  # not in this vocab
                ids.extend(piece)
                trained.extend([part.trained] * len(piece))
            else:
                run.append(part.text)
            last = part.trained
        flush(last)
        return ids, trained

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    image_token_id: int | None = None) -> list[int]:
        """The conversation in DeepSeek-V3's format, content as text (BOS included once);
        with `image_token_id`, a user's image parts as that placeholder id (`chat_parts`)."""
        return self.encode_parts(chat_parts(messages, add_generation_prompt, image_token_id))[0]


_PLAIN: dict[int, tuple[object, int, object]] = {}  # id(tokenizer) -> (it, its size, its copy)
_PLAIN_LOCK = threading.Lock()


def plain_text_tokenizer(tok):
    """A copy of `tok` (a `tokenizers.Tokenizer`) that reads its special tokens, and any added
    token written like a tag (`<think>`, `<｜User｜>`, special or not), as ordinary text
    (`encode_special_tokens`). A copy, not the flag flipped on `tok`: the engine encodes with
    `tok` from other threads, and a completion prompt may mean its markers. Built once per
    tokenizer (a few of them kept)."""
    size = tok.get_vocab_size(with_added_tokens=True)
    with _PLAIN_LOCK:
        hit = _PLAIN.get(id(tok))
        if hit is not None and hit[0] is tok and hit[1] == size:
            return hit[2]
        from tokenizers import Tokenizer as HFTokenizer
        spec = json.loads(tok.to_str())
        for added in spec.get("added_tokens") or []:
            text = added.get("content", "")
            if text in SPECIAL_TOKENS or (text.startswith("<") and text.endswith(">") and len(text) > 2):
                added["special"] = True
        plain = HFTokenizer.from_str(json.dumps(spec))
        plain.encode_special_tokens = True
        plain.no_truncation()
        plain.no_padding()
        if len(_PLAIN) >= 8:
            _PLAIN.pop(next(iter(_PLAIN)))
        _PLAIN[id(tok)] = (tok, size, plain)
        return plain
