"""Where the text comes from.

The default corpus is the English text of `pydoc_data.topics`, the help pages of the
Python language (~470 kB, 79 topics) that every Python install carries, so the speedrun
needs no download. Users point at their own `.txt`, `.jsonl`/`.json` or `.parquet` files
(or directories of them), read with `datasets` from local paths. A file that is missing,
unreadable, corrupt or empty is an error that names it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

SUFFIXES = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CorpusError(ValueError):
    """A corpus file is missing, unreadable or holds no text."""


def default_corpus(chunk_chars: int = 2000) -> list[str]:
    """The pydoc topics in a fixed order, cut at paragraph breaks into documents of about
    `chunk_chars` characters, so the train / validation split draws from every kind of
    topic rather than from a handful of long ones."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        chunk = ""
        for para in topics[key].split("\n\n"):
            chunk = f"{chunk}\n\n{para}" if chunk else para
            if len(chunk) >= chunk_chars:
                docs.append(chunk.strip())
                chunk = ""
        if chunk.strip():
            docs.append(chunk.strip())
    return [d for d in docs if d]


def expand(paths: list[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus every supported file inside named directories."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise CorpusError(f"{p}: directory holds no {'/'.join(SUFFIXES)} files")
            files += found
        elif p.exists():
            if p.suffix.lower() not in SUFFIXES:
                raise CorpusError(f"{p}: unsupported file type {p.suffix!r}; expected one of "
                                  f"{sorted(SUFFIXES)}")
            files.append(p)
        else:
            raise CorpusError(f"{p}: no such file or directory")
    return files


def load_file(path: Path, text_field: str = "text") -> list[str]:
    """One file -> documents. Text files split at blank lines (paragraphs); JSON lines and
    Parquet give one document per row from the `text_field` column."""
    import datasets

    kind = SUFFIXES[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: file is empty")
    kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        bad = _unicode_error(e)
        if bad is not None:
            raise CorpusError(_not_utf8(path, bad)) from None
        raise CorpusError(f"{path}: cannot be read as {kind} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if text_field not in ds.column_names:
        raise CorpusError(f"{path}: no '{text_field}' column (columns: {ds.column_names})")
    try:
        values = list(ds[text_field])  # pyarrow decodes the strings only here
    except UnicodeDecodeError as e:
        raise CorpusError(_not_utf8(path, e)) from None
    return _documents(path, kind, values, text_field)


def _documents(path: Path, kind: str, values: list, text_field: str) -> list[str]:
    """The rows' texts. A row without a string in `text_field` is an error naming its line
    (it would silently shrink the corpus); blank texts are skipped, and the count is said."""
    for i, t in enumerate(values):
        if not isinstance(t, str):
            where = f"line {_line_of_row(path, i)}" if kind == "json" else f"row {i + 1}"
            raise CorpusError(f"{path}: {where} has no text in field '{text_field}' (got "
                              f"{type(t).__name__}); fix or remove such rows")
    docs = [t.strip() for t in values if t.strip()]
    if not docs:
        raise CorpusError(f"{path}: holds no text")
    if len(docs) < len(values) and kind != "text":  # in text files: runs of blank lines
        warnings.warn(f"{path}: skipped {len(values) - len(docs)} of {len(values)} rows whose "
                      f"'{text_field}' is blank", stacklevel=3)
    return docs


def _line_of_row(path: Path, row: int) -> int:
    """1-based line of the row-th record of a JSON-lines file (blank lines hold no record)."""
    if path.suffix.lower() != ".jsonl":
        return row + 1
    with open(path, encoding="utf-8", errors="replace") as f:
        seen = -1
        for n, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return n
    return row + 1


@contextlib.contextmanager
def quiet_datasets():
    """Reading a local file is instant: no "Generating train split" bars or info logs
    from `datasets` (its settings are restored afterwards)."""
    import datasets

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parse error becomes our CorpusError
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _not_utf8(path: Path, bad: UnicodeDecodeError) -> str:
    return (f"{path}: not valid UTF-8 (byte 0x{bad.object[bad.start]:02x} at offset {bad.start}: "
            f"{bad.reason}); re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")


def _unicode_error(e: BaseException | None) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError behind a `datasets` error, if that is what it wraps."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UnicodeDecodeError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def load_corpus(paths: list[str | os.PathLike] | None = None, text_field: str = "text") -> list[str]:
    """Documents from `paths`, or the embedded default corpus when none are given."""
    if not paths:
        return default_corpus()
    docs: list[str] = []
    for f in expand(paths):
        docs += load_file(f, text_field)
    return docs
