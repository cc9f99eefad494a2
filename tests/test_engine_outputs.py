"""engine/outputs.py: the incremental detokeniser against a full decode, on a byte-level BPE."""

from __future__ import annotations

import pytest

from nanoseek.engine import SamplingParams
from nanoseek.engine.outputs import IncrementalDetokenizer
from nanoseek.text.tokenizer import TOOL_TOKENS, Tokenizer, train_tokenizer
from tests.train_utils import small_corpus

TEXTS = [
    "The cache holds latents, not keys: 576 numbers per token.",
    "naïve ünïcode — 深度求索 compresses the KV cache ✓ 🚀🚀 done",
    "call" + TOOL_TOKENS[0] + TOOL_TOKENS[2] + "function" + TOOL_TOKENS[4] + "add\n```json\n{\"a\": 1}\n```"
    + TOOL_TOKENS[3] + TOOL_TOKENS[1] + " then 日本語",
    "🚀" * 5 + "终",  # nothing but characters that BPE splits into bytes
]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained on ASCII only (as tests/test_tokenizer.py builds one), so
    every CJK character and emoji is 3-4 byte tokens: half characters at most prefixes."""
    return Tokenizer.of(train_tokenizer(small_corpus(40), vocab_size=512))


def feed(tok, ids, params):
    """Feed ids one at a time; after each, check the text against a full decode of the prefix."""
    detok, split, texts = IncrementalDetokenizer(tok, params), 0, []
    for k in range(1, len(ids) + 1):
        assert detok.add(ids[k - 1]) is None
        full = tok.decode(ids[:k], params.skip_special_tokens)
        assert full.startswith(detok.text), (k, full, detok.text)
        if full.endswith("\ufffd"):
            split += 1            # half a character: held back, not shown
        else:
            assert detok.text == full, (k, full, detok.text)
        assert detok.output_text(finished=True) == full  # a request ending here gets the full decode
        texts.append(detok.output_text(finished=False))
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # streamed text only grows
    return detok, split


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_equals_full_decode_on_every_prefix(tok, skip):
    params = SamplingParams(skip_special_tokens=skip)
    splits = 0
    for text in TEXTS:
        ids = tok.encode(text)
        detok, split = feed(tok, ids, params)
        splits += split
        assert detok.text == tok.decode(ids, skip)
    assert splits > 10  # multi-byte characters really were split across tokens


def test_special_tokens_are_kept_when_asked(tok):
    ids = tok.encode(TEXTS[2])
    kept = feed(tok, ids, SamplingParams(skip_special_tokens=False))[0].text
    skipped = feed(tok, ids, SamplingParams())[0].text
    assert TOOL_TOKENS[0] in kept and TOOL_TOKENS[3] in kept
    assert not any(t in skipped for t in TOOL_TOKENS) and skipped.startswith("callfunctionadd")


def test_stop_string_across_multibyte_tokens(tok):
    ids = tok.encode(TEXTS[1])
    full = tok.decode(ids)
    params = SamplingParams(stop=["深度"])
    detok = IncrementalDetokenizer(tok, params)
    hit, shown = None, []
    for t in ids:
        hit = detok.add(t)
        shown.append(detok.output_text(finished=hit is not None))
        if hit:
            break
    assert hit == "深度" and detok.text == full[:full.find("深度")]
    assert all("深" not in s for s in shown)  # never streamed a part of the stop string
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))


def test_held_back_stop_prefix_and_half_characters():
    class Chars:  # token i -> PIECES[i]; one "character" split over two byte tokens
        PIECES = [b"ab", b"\xe6\xb7", b"\xb1", b"c", b"X", b"Y"]

        def decode(self, ids, skip_special_tokens=True):
            return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(Chars(), SamplingParams(stop=["cXZ"]))
    seen = []
    for t in (0, 1, 2, 3, 4, 5):
        assert detok.add(t) is None
        seen.append(detok.output_text(finished=False))
    assert seen == ["ab", "ab", "ab深", "ab深", "ab深", "ab深cXY"]  # half 深 held, then "c", "cX" held


def test_stop_strings_are_bounded():
    """The held-back-tail check costs O(len(stop)^2) a token: a 100,000-character stop given
    through the Python API stalled every token; it is refused with the bound named."""
    import pytest

    from nanoseek.engine.sampler import MAX_STOP_CHARS, MAX_STOPS, SamplingParams

    SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOPS)
    for stop in (["y" * 100_000], ["z"] * (MAX_STOPS + 1)):
        with pytest.raises(ValueError, match="stop.*at most"):
            SamplingParams(stop=stop)
