"""Corpora (the embedded default and users' files) and their token arrays."""

from nanoseek.data.corpus import CorpusError, default_corpus, load_corpus
from nanoseek.data.tokenized import TokenArrays, build_token_arrays

__all__ = ["CorpusError", "TokenArrays", "build_token_arrays", "default_corpus", "load_corpus"]
