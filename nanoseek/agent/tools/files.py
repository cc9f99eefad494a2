"""read_file / write_file / list_files, confined to one workspace directory.

A path is taken relative to the workspace (an absolute path must spell the workspace's own
path first); `..` is refused outright. The path is then walked one component at a time
from a descriptor of the workspace held open since the start, each component opened
relative to the previous one with O_NOFOLLOW (`os.open(..., dir_fd=...)`): a symbolic
link anywhere in the path — pointing out or in, planted beforehand or swapped in during
the call — is refused, and since the open itself is the check there is no window between
checking a path and using it. Once open, a file is used only if it is a regular file with
a single link: a hard link planted to a file outside the workspace would otherwise be read
or overwritten through, and a fifo or a device could block the call or never end (they
are opened O_NONBLOCK, then refused). Reads take at most 4 bytes per character returned,
and a listing reads at most MAX_SCAN entries.

Not covered: a directory that someone with write access both inside and outside the
workspace moves out of it while a call walks through it; mount points inside the workspace.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath

from nanoseek.agent.tools.base import Tool, ToolError

MAX_READ_CHARS = 20_000
MAX_WRITE_CHARS = 1_000_000
MAX_LIST = 500
MAX_SCAN = 10_000
MAX_PATH_CHARS = 4096
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._bases = {PurePosixPath(self.root), PurePosixPath(os.path.abspath(root))}
        self._fd = os.open(self.root, _DIR)  # every path is walked from here

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def parts(self, path: str) -> list[str]:
        """The components of `path` below the workspace, or ToolError saying why not."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path: give a non-empty path relative to the workspace")
        if "\0" in path or len(path) > MAX_PATH_CHARS:
            raise ToolError(f"path: no NUL characters, at most {MAX_PATH_CHARS} characters")
        p = PurePosixPath(path)
        if ".." in p.parts:
            raise ToolError(f"path {path!r}: '..' is not allowed (stay inside the workspace)")
        if p.is_absolute():
            base = next((b for b in self._bases if p.is_relative_to(b)), None)
            if base is None:
                raise ToolError(f"path {path!r} is outside the workspace ({self.root})")
            p = p.relative_to(base)
        return [c for c in p.parts if c not in ("", ".")]

    def read(self, path: str, max_chars: int = MAX_READ_CHARS) -> str:
        parts = self.parts(path)
        with self._file(path, parts, os.O_RDONLY) as (fd, size):
            limit = max_chars * 4           # UTF-8: at most 4 bytes a character
            data = _read_at_most(fd, limit + 1)
        text = data[:limit].decode("utf-8", errors="replace")
        if len(data) <= limit and len(text) <= max_chars:
            return text
        return text[:max_chars] + f"\n[... truncated: the file is {size:,} bytes]"

    def write(self, path: str, content: str) -> str:
        if not isinstance(content, str):
            raise ToolError(f"content: give text, not {type(content).__name__}")
        if len(content) > MAX_WRITE_CHARS:
            raise ToolError(f"content of {len(content):,} characters is over {MAX_WRITE_CHARS:,}")
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ToolError(f"content: not valid Unicode text ({e.reason} at character {e.start})") from None
        parts = self.parts(path)
        with self._file(path, parts, os.O_WRONLY | os.O_CREAT) as (fd, _):
            os.ftruncate(fd, 0)             # only now: the checks came first
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        return f"wrote {len(content):,} characters to {'/'.join(parts)}"

    def list(self, path: str = ".") -> str:
        parts = self.parts(path)
        fd = self._walk(path, parts)
        try:
            entries, complete = [], True
            with os.scandir(fd) as it:
                for e in it:
                    if len(entries) == MAX_SCAN:
                        complete = False
                        break
                    entries.append(e)
            entries.sort(key=lambda e: e.name)
            lines = [_describe("/".join(parts + [e.name]), e) for e in entries[:MAX_LIST]]
        finally:
            os.close(fd)
        if len(entries) > MAX_LIST:
            lines.append(f"[... {len(entries) - MAX_LIST} more" +
                         ("]" if complete else f"; only the first {MAX_SCAN:,} entries were read]"))
        return "\n".join(lines) or "(empty)"

    def _walk(self, path: str, parts: list[str], create: bool = False) -> int:
        """A new descriptor of the directory `parts`, opened component by component without
        following links (created when missing if `create`); the caller closes it."""
        fd = os.open(".", _DIR, dir_fd=self._fd)
        try:
            for name in parts:
                nxt = _subdir(path, name, fd, create)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def _file(self, path: str, parts: list[str], flags: int):
        """(descriptor, size) of the regular, singly-linked file `parts`."""
        if not parts:
            raise ToolError(f"{path!r} is the workspace's directory, not a file (list_files lists it)")
        dfd = self._walk(path, parts[:-1], create=bool(flags & os.O_CREAT))
        try:
            fd = os.open(parts[-1], flags | _FILE, 0o644, dir_fd=dfd)
        except FileNotFoundError:
            raise ToolError(f"{path!r}: no such file or directory in the workspace") from None
        except OSError as e:
            raise _explain(path, parts[-1], e, dfd) from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ToolError(f"{path!r} is not a regular file ({_kind(st.st_mode)}): refused")
            if st.st_nlink > 1:
                raise ToolError(f"{path!r} has {st.st_nlink} hard links; a hard link can point to a file "
                                "outside the workspace, so it is refused")
            yield fd, st.st_size
        finally:
            os.close(fd)


def _subdir(path: str, name: str, fd: int, create: bool) -> int:
    """Open directory `name` under `fd` without following a link; made first when missing
    and `create` (if something else appears there meanwhile, the open still checks it)."""
    try:
        try:
            return os.open(name, _DIR, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise ToolError(f"{path!r}: no such file or directory in the workspace") from None
            with suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            return os.open(name, _DIR, dir_fd=fd)
    except OSError as e:
        raise _explain(path, name, e, fd) from None


def _read_at_most(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        b = os.read(fd, min(left, 1 << 16))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def _explain(path: str, name: str, e: OSError, dir_fd: int) -> ToolError:
    """The refusal for opening `name` (a component of `path`), in words."""
    what = repr(path) if name == path else f"{path!r}: {name!r}"
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISLNK(mode):
        return ToolError(f"{what} is a symbolic link; the file tools do not follow links")
    if e.errno == errno.EISDIR or (mode is not None and stat.S_ISDIR(mode)):
        return ToolError(f"{what} is a directory")
    if mode is not None and not stat.S_ISREG(mode):
        return ToolError(f"{what} is not a regular file ({_kind(mode)}): refused")
    if e.errno == errno.ENOTDIR:
        return ToolError(f"{what} is not a directory")
    return ToolError(f"{path!r}: {e.strerror}")


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "not a regular file"


def _describe(shown: str, e: os.DirEntry) -> str:
    """One line of a listing; links are shown as links, never followed."""
    if e.is_symlink():
        return f"{shown}@ (symbolic link, not followed)"
    if e.is_dir(follow_symlinks=False):
        return f"{shown}/"
    try:
        return f"{shown} ({e.stat(follow_symlinks=False).st_size} bytes)"
    except OSError:
        return shown


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
