"""read_file / write_file / list_files, confined to one workspace directory.

A path is taken relative to the workspace; `..` components are refused outright, an
absolute path must lie inside the workspace, and the path is then resolved (symlinks
followed) and must still lie inside it — a symlink planted in the workspace that points
out is refused. (A race between the check and the open, with a symlink swapped in between,
is not covered: the workspace should not be shared with a hostile writer.)
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from nanoseek.agent.tools.base import Tool, ToolError

MAX_READ_CHARS = 20_000
MAX_WRITE_CHARS = 1_000_000
MAX_LIST = 500


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, path: str) -> Path:
        """The real path of `path` inside the workspace, or ToolError saying why not."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path: give a non-empty path relative to the workspace")
        if ".." in PurePosixPath(path).parts:
            raise ToolError(f"path {path!r}: '..' is not allowed (stay inside the workspace)")
        p = Path(path)
        full = (p if p.is_absolute() else self.root / p).resolve()
        if full != self.root and not full.is_relative_to(self.root):
            raise ToolError(f"path {path!r} resolves to {full}, outside the workspace")
        return full

    def show(self, full: Path) -> str:
        return str(full.relative_to(self.root)) if full != self.root else "."

    def read(self, path: str, max_chars: int = MAX_READ_CHARS) -> str:
        full = self.resolve(path)
        if not full.is_file():
            raise ToolError(f"{path!r}: no such file in the workspace")
        text = full.read_text(errors="replace")
        if len(text) > max_chars:
            return text[:max_chars] + f"\n[... truncated: {len(text):,} characters in all]"
        return text

    def write(self, path: str, content: str) -> str:
        if len(content) > MAX_WRITE_CHARS:
            raise ToolError(f"content of {len(content):,} characters is over {MAX_WRITE_CHARS:,}")
        full = self.resolve(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(content)
        return f"wrote {len(content):,} characters to {self.show(full)}"

    def list(self, path: str = ".") -> str:
        full = self.resolve(path)
        if not full.is_dir():
            raise ToolError(f"{path!r}: no such directory in the workspace")
        entries = sorted(full.iterdir())
        lines = [self.show(e) + ("/" if e.is_dir() else f" ({e.lstat().st_size} bytes)")
                 for e in entries[:MAX_LIST]]
        if len(entries) > MAX_LIST:
            lines.append(f"[... {len(entries) - MAX_LIST} more]")
        return "\n".join(lines) or "(empty)"


def file_tools(root: str | Path) -> list[Tool]:
    ws = Workspace(root)
    path = {"type": "string", "description": "a path relative to the workspace"}
    return [
        Tool("read_file", "Read a text file of the workspace.",
             {"type": "object", "properties": {"path": path}, "required": ["path"]}, ws.read),
        Tool("write_file", "Write (create or replace) a text file in the workspace.",
             {"type": "object", "properties": {"path": path, "content": {"type": "string"}},
              "required": ["path", "content"]}, ws.write),
        Tool("list_files", "List a directory of the workspace ('.' = its root).",
             {"type": "object", "properties": {"path": path}}, ws.list),
    ]
