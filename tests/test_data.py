import json

import numpy as np
import pytest
import torch

from nanoseek.data import CorpusError, TokenArrays, build_token_arrays, default_corpus, load_corpus
from nanoseek.data.tokenized import split_documents
from nanoseek.text.tokenizer import train_tokenizer
from tests.train_utils import small_corpus


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(small_corpus(30), vocab_size=384)


def test_default_corpus_is_pydoc_english():
    docs = default_corpus()
    assert len(docs) > 100 and sum(map(len, docs)) > 400_000
    assert any("for" in d and "statement" in d for d in docs)
    assert default_corpus() == docs  # fixed order


def test_user_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "row one"}) + "\n" + json.dumps({"text": "row two"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    docs = load_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"])
    assert docs == ["first paragraph\nstill first", "second paragraph", "row one", "row two", "parquet row"]
    assert load_corpus([tmp_path]) == docs  # a directory expands to its files, sorted


def test_bad_files_are_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty.txt: file is empty"):
        load_corpus([empty])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="blank.txt"):
        load_corpus([blank])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match="bad.jsonl: cannot be read"):
        load_corpus([bad])
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="nocol.jsonl: no 'text' column"):
        load_corpus([nocol])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(CorpusError, match="corrupt.parquet"):
        load_corpus([corrupt])
    with pytest.raises(CorpusError, match="missing.txt: no such file"):
        load_corpus([tmp_path / "missing.txt"])
    with pytest.raises(CorpusError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a")
        load_corpus([tmp_path / "x.csv"])


def test_split_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(200)]
    a = split_documents(docs, 0.1, seed=3)
    assert a == split_documents(docs, 0.1, seed=3)
    assert a != split_documents(docs, 0.1, seed=4)
    train, val = a
    assert not set(train) & set(val) and len(train) + len(val) == 200
    assert 5 <= len(val) <= 40
    assert all(split_documents(["x", "y"], 0.01, seed=s)[1] for s in range(5))  # never empty


def test_token_arrays_memmapped_cached_and_batched(tmp_path, tok):
    docs = small_corpus(60)
    data = build_token_arrays(docs, tok, tmp_path, val_fraction=0.1, seed=0)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert data.train[0] == tok.bos_token_id and data.val[-1] == tok.eos_token_id
    assert data.meta["train_tokens"] + data.meta["val_tokens"] == sum(
        len(tok(d, add_special_tokens=False)["input_ids"]) + 2 for d in docs)
    mtime = (tmp_path / "train.bin").stat().st_mtime_ns
    again = build_token_arrays(docs, tok, tmp_path, val_fraction=0.1, seed=0)
    assert (tmp_path / "train.bin").stat().st_mtime_ns == mtime  # tokenised once
    assert again.meta == data.meta
    x, y = data.batch(step=5, micro=1, batch_size=4, seq_len=32, seed=7)
    x2, y2 = data.batch(step=5, micro=1, batch_size=4, seq_len=32, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, data.batch(step=6, micro=1, batch_size=4, seq_len=32, seed=7)[0])
    windows = list(data.val_windows(seq_len=32))
    n = sum(y.numel() for _, y in windows)
    assert n == (len(data.val) - 1) // 32 * 32


def test_truncated_array_is_an_error(tmp_path, tok):
    build_token_arrays(small_corpus(20), tok, tmp_path)
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CorpusError, match="train.bin: expected"):
        TokenArrays.open(tmp_path)


def test_unigram_baseline_is_near_entropy(tmp_path, tok):
    from nanoseek.text.tokenizer import token_byte_lengths
    data = build_token_arrays(small_corpus(60), tok, tmp_path)
    base = data.unigram_baseline(32, token_byte_lengths(tok))
    assert 3.0 < base["unigram_loss"] < np.log(len(tok))
    assert 0.5 < base["unigram_bpb"] < 8


@pytest.mark.parametrize("seed", [31, 32, 43])
def test_single_document_trains_and_holds_out_its_tail(tmp_path, tok, seed):
    """One document never lands wholly in validation (these seeds drew it there): it goes to
    training and the tail of its tokens is the validation split, with its bytes counted."""
    doc = "\n\n".join(small_corpus(20))
    assert split_documents([doc], 0.1, seed) == ([doc], [])
    data = build_token_arrays([doc], tok, tmp_path, val_fraction=0.1, seed=seed)
    assert data.meta["train_docs"] == 1 and data.meta["val_docs"] == 0
    assert len(data.train) > 0 and len(data.val) > 0
    from nanoseek.text.tokenizer import token_byte_lengths
    lengths = token_byte_lengths(tok)
    assert data.meta["val_bytes"] == sum(lengths[int(t)] for t in data.val) > 0


def test_a_split_of_exactly_one_window_batches(tmp_path, tok):
    data = build_token_arrays(small_corpus(20), tok, tmp_path)
    one = TokenArrays(np.asarray(data.train[:33]), data.val, data.meta)  # seq_len + 1 tokens
    x, y = one.batch(step=0, micro=0, batch_size=2, seq_len=32, seed=0)
    assert x.shape == (2, 32) and torch.equal(x[0], torch.from_numpy(one.train[:32].astype(np.int64)))
    short = TokenArrays(np.asarray(data.train[:32]), data.val, data.meta)
    with pytest.raises(CorpusError, match="fewer than"):
        short.batch(step=0, micro=0, batch_size=2, seq_len=32, seed=0)


def test_jsonl_row_without_text_is_refused_with_its_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join([json.dumps({"text": "one"}), "", json.dumps({"body": "two"}),
                            json.dumps({"text": "three"})]) + "\n")
    with pytest.raises(CorpusError, match=r"rows.jsonl: line 3 has no text in field 'text'"):
        load_corpus([f])


def test_blank_rows_are_counted_not_dropped_silently(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["one", " ", "", "two"]) + "\n")
    with pytest.warns(UserWarning, match="skipped 2 of 4 rows"):
        assert load_corpus([f]) == ["one", "two"]


@pytest.mark.parametrize("name,data", [("latin.txt", "caf\xe9\n\nau lait"),
                                       ("latin.jsonl", '{"text": "caf\xe9"}\n')])
def test_non_utf8_file_error_names_the_encoding(tmp_path, name, data):
    (tmp_path / name).write_bytes(data.encode("latin-1"))
    with pytest.raises(CorpusError, match=f"{name}: not valid UTF-8 \\(byte 0xe9"):
        load_corpus([tmp_path / name])
