"""SFT data: labels are the assistant's tokens exactly (tool calls in, tool outputs out),
packing keeps every conversation whole, bad rows are named by file and line."""

import pytest

from nanoseek.text.chat_template import chat_segments, render_chat
from nanoseek.data.chat import (ChatDataError, chat_windows, encode_with_mask, pack, read_conversations,
                                shift_labels)
from nanoseek.data.preferences import encode_pairs, read_pairs
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.text.tokenizer import load_tokenizer
from tests.posttrain_utils import make_init, write_jsonl

TOOL_CHAT = [
    {"role": "system", "content": "You can use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21C"},
    {"role": "assistant", "content": "It is sunny and 21C."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_init(tmp_path_factory.mktemp("init")))


def _target_text(tok, ids, labels):
    """The text of the target tokens, each maximal run of targets on its own."""
    runs, cur = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if cur:
                runs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(label)
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_labels_are_exactly_the_assistant_spans_of_a_tool_conversation(tok):
    ids, trained = encode_with_mask(TOOL_CHAT, tok)
    # tokenising piece by piece gives the ids of the whole rendered text
    assert ids == tok(render_chat(TOOL_CHAT), add_special_tokens=False)["input_ids"]
    x, y = shift_labels(ids, trained)
    assert len(x) == len(y) == len(ids) - 1
    assistant = [text for text, t in chat_segments(TOOL_CHAT) if t]
    assert _target_text(tok, x, y) == assistant  # three turns, tool call markers and eos included
    assert "sunny, 21C" not in "".join(_target_text(tok, x, y)[:1] + _target_text(tok, x, y)[2:])
    for i, label in enumerate(y):  # a label is the next token exactly where it is trained
        assert label == (ids[i + 1] if trained[i + 1] else IGNORE_INDEX)
    user_and_tool = [text for text, t in chat_segments(TOOL_CHAT) if not t]
    assert any("sunny, 21C" in s for s in user_and_tool) and any("Weather" in s for s in user_and_tool)


def test_packing_keeps_conversations_whole_and_masks_padding():
    examples = [([1, 2, 3], [2, 3, -100]), ([4, 5], [5, 6]), ([7, 8, 9, 10], [8, 9, 10, 11])]
    w = pack(examples, seq_len=6, pad_id=0)
    assert w.inputs.tolist() == [[1, 2, 3, 4, 5, 0], [7, 8, 9, 10, 0, 0]]
    assert w.labels.tolist() == [[2, 3, -100, 5, 6, -100], [8, 9, 10, 11, -100, -100]]
    one = pack(examples, seq_len=6, pad_id=0, packing=False)
    assert len(one) == 3 and one.inputs[1].tolist() == [4, 5, 0, 0, 0, 0]
    cut = pack([([1] * 9, [1] * 9)], seq_len=6, pad_id=0)
    assert cut.truncated == 1 and cut.labels.tolist() == [[1] * 6]


def test_windows_batches_are_a_pure_function_of_the_index(tok):
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(10)]
    w = chat_windows(convs, tok, seq_len=16, packing=False)
    assert len(w) == 10 and w.meta["targets"] == w.targets > 0
    a, b = w.batch(3, 4, seed=1), w.batch(3, 4, seed=1)
    assert (a[0] == b[0]).all() and not (w.batch(3, 4, seed=2)[0] == a[0]).all()
    seen = {tuple(w.batch(i, 5, seed=0)[0][j].tolist()) for i in range(2) for j in range(5)}
    assert len(seen) == 10  # one epoch shows every window once


def test_rows_prompt_response_and_errors_name_the_line(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "response": "hello", "system": "be brief"},
                                              {"messages": TOOL_CHAT}])
    convs = read_conversations(good)
    assert convs[0] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n\n{"text": "no chat"}\n')
    with pytest.raises(ChatDataError, match=r"b\.jsonl:3: expected 'messages', or 'prompt' and 'response'"):
        read_conversations(bad)
    bad.write_text('{"prompt": "x", "response": "y"}\n{oops\n')
    with pytest.raises(ChatDataError, match=r"b\.jsonl:2: not valid JSON"):
        read_conversations(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ChatDataError, match=r"b\.jsonl:1: no assistant message"):
        read_conversations(bad)
    bad.write_bytes(b'{"prompt": "x", "response": "y"}\n{"prompt": "caf\xe9", "response": "y"}\n')
    with pytest.raises(ChatDataError, match=r"b\.jsonl:2: not UTF-8 text"):
        read_conversations(bad)
    bad.write_text('{"prompt": "hi \\ud800", "response": "y"}\n')
    with pytest.raises(ChatDataError, match=r"b\.jsonl:1: holds '\\ud800', a lone surrogate"):
        read_conversations(bad)
    bad.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ChatDataError, match=r"b\.jsonl:1: JSON nested too deep"):
        read_conversations(bad)
    bad.write_bytes(b'\xef\xbb\xbf{"prompt": "x", "response": "y"}\n')  # a BOM
    assert read_conversations(bad)[0][0] == {"role": "user", "content": "x"}


def test_preference_pairs_label_only_the_completions(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "five"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "hello"},
         "rejected": "go away"}])
    pairs = encode_pairs(read_pairs(path), tok, max_len=64)
    (xc, yc), (_, yr) = pairs.chosen, pairs.rejected
    targets = [tok.decode([t for t in row if t != IGNORE_INDEX], skip_special_tokens=False) for row in yc.tolist()]
    assert targets == ["4<｜end▁of▁sentence｜>", "hello<｜end▁of▁sentence｜>"]
    assert tok.decode([t for t in yr[1].tolist() if t != IGNORE_INDEX], skip_special_tokens=True) == "go away"
    sub = pairs.select([0])  # the padding no selected pair needs is cut
    assert sub.chosen[0].shape[1] == int((yc[0] != IGNORE_INDEX).nonzero().max()) + 1 < xc.shape[1]
    assert (sub.chosen[1] != IGNORE_INDEX).sum() == (yc[0] != IGNORE_INDEX).sum()
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(ChatDataError, match=r"q\.jsonl:1: 'rejected' must be a string"):
        read_pairs(bad)
    with pytest.raises(ChatDataError, match="more than --seq-len 4"):
        encode_pairs(read_pairs(path), tok, max_len=4)
