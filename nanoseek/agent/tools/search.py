"""`search`: semantic search over local documents (text and Markdown files of a directory),
cut into overlapping chunks of about `chunk_chars` characters, embedded with MiniLM
(nanoseek/agent/embeddings.py) and searched with FAISS. The index is built once, when the
tool is made."""

from __future__ import annotations

from pathlib import Path

from nanoseek.agent.tools.base import Tool, ToolError
from nanoseek.agent.vector_store import VectorStore

SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv")


def chunk(text: str, chunk_chars: int = 800, overlap: int = 100) -> list[str]:
    """Pieces of about chunk_chars, cut at a paragraph or line break where one is near."""
    text, out, start = text.strip(), [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = max(text.rfind("\n\n", start, end), text.rfind("\n", start, end))
            end = cut if cut > start + chunk_chars // 2 else end
        out.append(text[start:end].strip())
        start = end if end == len(text) else max(end - overlap, start + 1)
    return [c for c in out if c]


def build_index(docs_dir: str | Path, embed_fn=None, chunk_chars: int = 800) -> VectorStore:
    root = Path(docs_dir)
    if not root.is_dir():
        raise ValueError(f"--docs {docs_dir}: not a directory")
    texts, meta = [], []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES):
        for i, c in enumerate(chunk(f.read_text(errors="replace"), chunk_chars)):
            texts.append(c)
            meta.append({"file": str(f.relative_to(root)), "chunk": i})
    store = VectorStore(embed_fn)
    store.add(texts, meta)
    return store


def search_tool(docs_dir: str | Path, embed_fn=None, k: int = 3) -> Tool:
    store = build_index(docs_dir, embed_fn)

    def search(query: str, top_k: int = k) -> str:
        if not store.texts:
            raise ToolError(f"no documents to search in {docs_dir}")
        hits = store.search(query, max(1, min(int(top_k), 10)))
        return "\n\n".join(f"[{m['file']} #{m['chunk']}, score {s:.3f}]\n{t}" for s, t, m in hits)

    return Tool("search", f"Search the local documents ({len(store.texts)} passages) by meaning; "
                "returns the best passages with their file names.",
                {"type": "object", "properties": {
                    "query": {"type": "string"},
                    "top_k": {"type": "integer", "description": "passages to return (1-10)"}},
                 "required": ["query"]}, search)
