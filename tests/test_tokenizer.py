import pytest

from nanoseek.text.tokenizer import (BOS, EOS, PAD, SPECIAL_TOKENS, TokenizerError, load_tokenizer,
                                     save_tokenizer, token_byte_lengths, train_tokenizer)
from tests.train_utils import small_corpus


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(small_corpus(40), vocab_size=512), d)
    return d


def test_special_token_ids_match_the_tiny_preset(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids([BOS, EOS, PAD]) == [0, 1, 2]
    assert all(tok.convert_tokens_to_ids(t) == i for i, t in enumerate(SPECIAL_TOKENS))
    assert len(tok) == 512


def test_roundtrip_and_digits_split(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "def f(x):\n    return x ** 2  # 12345 — naïve ünïcode ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    digits = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"])
    assert digits == list("12345")
    assert tok("hi")["input_ids"][0] == 0  # bos prepended, like DeepSeek's tokenizer


def test_autotokenizer_loads_with_chat_template(tok_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == f"{BOS}Be brief.<｜User｜>2+2?<｜Assistant｜>4{EOS}"
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜>")
    out = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"4{EOS}"
    tools = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "2"}]
    t = tok.apply_chat_template(msgs[1:2] + tools, tokenize=False)
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>add" in t and '{"a": 1}' in t
    assert "<｜tool▁output▁begin｜>2<｜tool▁output▁end｜>" in t


def test_byte_lengths_count_utf8_bytes(tok_dir):
    tok = load_tokenizer(tok_dir)
    lengths = token_byte_lengths(tok)
    text = "Übersetzung of 3 words"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert sum(lengths[i] for i in ids) == len(text.encode())
    assert lengths[0] == lengths[1] == 0


def test_bad_inputs():
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer(["", ""], vocab_size=512)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer("/nonexistent-dir")


def test_encoding_a_long_text_in_a_thread_lets_the_main_thread_run(tok_dir):
    """The server tokenises prompts in a worker thread to keep its event loop running; that
    only helps if encoding releases the GIL (tokenizers' `encode` does not, `encode_batch`
    does). A heartbeat in this thread must keep ticking while a 2 MiB text is encoded."""
    import threading
    import time

    from nanoseek.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    text = "the quick brown fox jumps over 12345 lazy dogs. " * 44_000
    for encode in (tok.encode, tok.encode_text):
        worker = threading.Thread(target=encode, args=(text,))
        gaps, last = [], time.perf_counter()
        worker.start()
        while worker.is_alive():
            time.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        worker.join()
        # holding the GIL, the encode is one gap as long as the whole call; a loaded
        # machine stretches single gaps, never to half of a multi-second encode
        assert len(gaps) >= 10, f"{encode.__name__}: the heartbeat ticked {len(gaps)} times"
        assert max(gaps) < 0.5 * sum(gaps), (f"{encode.__name__} held the GIL for "
                                             f"{max(gaps):.2f} of {sum(gaps):.2f} s")
