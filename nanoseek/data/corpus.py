"""Where the text comes from.

The default corpus is the English text of `pydoc_data.topics`, the help pages of the
Python language (~470 kB, 79 topics) that every Python install carries, so the speedrun
needs no download. Users point at their own `.txt`, `.jsonl`/`.json` or `.parquet` files
(or directories of them), read with `datasets` from local paths. A file that is missing,
unreadable, corrupt or empty is an error that names it.
"""

from __future__ import annotations

import os
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
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        raise CorpusError(f"{path}: cannot be read as {kind} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if text_field not in ds.column_names:
        raise CorpusError(f"{path}: no '{text_field}' column (columns: {ds.column_names})")
    docs = [t.strip() for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise CorpusError(f"{path}: holds no text")
    return docs


def load_corpus(paths: list[str | os.PathLike] | None = None, text_field: str = "text") -> list[str]:
    """Documents from `paths`, or the embedded default corpus when none are given."""
    if not paths:
        return default_corpus()
    docs: list[str] = []
    for f in expand(paths):
        docs += load_file(f, text_field)
    return docs
