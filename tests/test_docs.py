"""Every code block of README.md and docs/**/*.md runs, and every relative link resolves.

A page that shows a command should show one that works: the README's first Python example
once crashed for months (`model.save_pretrained` had gone) because nothing ran it. The
conventions, which page authors write against:

* ```bash and ```python blocks run; ```text, ```console, ```toml, ```json, ```jsonl (outputs,
  file contents) do not.
* `<!-- doc-test: slow -->` on the line directly before a fence: the block runs only under
  `pytest -m slow` (`make test-all`). `<!-- doc-test: skip REASON -->`: it never runs, and the
  reason is required.
* A page's blocks run in order, in one fresh temporary directory that is their cwd: bash with
  `set -euo pipefail`, each python block as its own `python` process, the venv's bin first on
  PATH and NANOSEEK_DOC_TEST=1 set. Fast blocks form one test per page; a page with slow
  blocks has a second, slow test that runs the whole page (fast and slow blocks) in order.
* Each block has a timeout (fast 120 s, slow 1800 s); processes a block leaves behind are
  killed when it ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = ("bash", "python")
# languages that look runnable but would be silently left out: name them bash/python or text
MISNAMED = {"sh", "shell", "zsh", "py", "python3", "pycon"}
TIMEOUT_S = {"fast": 120, "slow": 1800}
TAIL_CHARS = 4000

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<kind>[\w-]*)(?P<rest>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its code and how it runs."""

    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str  # "fast", "slow" or "skip"


def pages() -> list[Path]:
    """README.md and every Markdown file under docs/, in a stable order."""
    found = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    return found + sorted((ROOT / "docs").glob("**/*.md"))


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks, and the errors in its doc-test markers and fence names."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, errors = [], []
    name, i = rel(page), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, indent, fence = i, m["lang"].lower(), m["indent"], m["fence"]
        i += 1
        body = []
        while i < len(lines) and not _closes(lines[i], fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence (or the end of an unclosed page)
        mode, error = _mode(lines[start - 1] if start else "", lang)
        where = f"{name}:{start + 1}"
        if error:
            errors.append(f"{where}: {error}")
        if lang in MISNAMED:
            errors.append(f"{where}: ```{lang} never runs; name it ```bash or ```python "
                          "(runs) or ```text/```console (output)")
        if lang in RUNNABLE:
            blocks.append(Block(name, start + 1, lang, "\n".join(body) + "\n", mode))
    errors += _stray_markers(lines, name)
    return blocks, errors


def _closes(line: str, fence: str) -> bool:
    s = line.strip()
    return s.startswith(fence[0] * len(fence)) and set(s) == {fence[0]}


def _mode(before: str, lang: str) -> tuple[str, str | None]:
    """How a block runs, from the marker on the line before its fence (if any)."""
    m = MARKER.match(before)
    if not m:
        return "fast", None
    kind, rest = m["kind"], m["rest"].strip()
    if lang not in RUNNABLE:
        return "skip", f"a doc-test marker only applies to ```bash/```python blocks, not ```{lang}"
    if kind == "slow":
        return "slow", (f"`doc-test: slow` takes no argument (got {rest!r})" if rest else None)
    if kind == "skip":
        return "skip", (None if rest else "`doc-test: skip` needs a reason, e.g. "
                        "`<!-- doc-test: skip needs 8 GPUs -->`")
    return "fast", f"unknown doc-test marker {kind!r} (use `slow` or `skip REASON`)"


def _stray_markers(lines: list[str], name: str) -> list[str]:
    """Markers that are not on the line directly before a fence apply to nothing."""
    return [f"{name}:{n + 1}: doc-test marker is not on the line directly before a fence"
            for n, line in enumerate(lines)
            if MARKER.match(line) and not (n + 1 < len(lines) and FENCE.match(lines[n + 1]))]


PARSED = {rel(p): parse(p) for p in pages()}


def _items():
    for name, (blocks, _) in PARSED.items():
        if any(b.mode == "fast" for b in blocks):
            yield pytest.param(name, "fast", id=name)
        if any(b.mode == "slow" for b in blocks):
            yield pytest.param(name, "slow", id=f"{name}[slow]", marks=pytest.mark.slow)


def test_markers_and_fences_are_well_formed():
    errors = [e for _, errs in PARSED.values() for e in errs]
    assert errors == [], "\n".join(errors)


@pytest.mark.parametrize(("page", "suite"), list(_items()))
def test_page_blocks_run(page: str, suite: str, tmp_path: Path):
    """The page's fast blocks (or, in the slow suite, all its runnable blocks) in order."""
    wanted = ("fast",) if suite == "fast" else ("fast", "slow")
    blocks = [b for b in PARSED[page][0] if b.mode in wanted]
    cwd, scratch = tmp_path / "cwd", tmp_path / "blocks"
    cwd.mkdir()
    scratch.mkdir()
    for block in blocks:
        _run(block, cwd, scratch, TIMEOUT_S[block.mode])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["NANOSEEK_DOC_TEST"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def _run(block: Block, cwd: Path, scratch: Path, timeout: int) -> None:
    """Run one block in its own process group; fail with the page, line, block and output."""
    script = scratch / f"line{block.line}.{'sh' if block.lang == 'bash' else 'py'}"
    if block.lang == "bash":
        script.write_text("set -euo pipefail\n" + block.code)
        argv = ["bash", str(script)]
    else:
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    log = scratch / f"line{block.line}.log"
    with open(log, "wb") as out:  # a file, not a pipe: a leftover child cannot hold it open
        proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, why = proc.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            rc, why = None, f"timed out after {timeout} s"
        finally:
            _kill_group(proc.pid)
            proc.wait()
    if why is None and rc != 0:
        why = f"exited with status {rc}"
    if why:
        pytest.fail(_failure(block, why, log.read_bytes().decode("utf-8", "replace")), pytrace=False)


def _kill_group(pgid: int) -> None:
    """End whatever the block left running (a server it forgot to stop), politely first."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _failure(block: Block, why: str, output: str) -> str:
    tail = output[-TAIL_CHARS:]
    if len(output) > TAIL_CHARS:
        tail = "[...]\n" + tail
    return (f"{block.page}:{block.line}: ```{block.lang} block {why}\n"
            f"--- block ---\n{block.code.rstrip()}\n--- output (tail) ---\n{tail.rstrip()}")


# --- links ---------------------------------------------------------------------------------

INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# a path of this machine or of the project's private notes, anywhere in a page
OUTSIDE = re.compile(r"\.\./shared\b|(?<![\w.~/-])/work/")


def prose(text: str) -> str:
    """The page without its fenced blocks and inline code spans (links there are examples)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m["fence"]
        elif fence is not None and _closes(line, fence):
            fence = None
        elif fence is None:
            out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return "\n".join(out)


def link_targets(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for rx in (INLINE_LINK, REF_LINK, HTML_LINK) for m in rx.finditer(body)]


def _ignored(paths: list[Path]) -> set[Path]:
    """Those of `paths` that git ignores: present here, absent from a clone."""
    if not paths or not (ROOT / ".git").exists():
        return set()
    res = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, capture_output=True,
                         input="\n".join(str(p.relative_to(ROOT)) for p in paths), text=True)
    return {ROOT / line for line in res.stdout.splitlines() if line}


def link_errors(page: Path) -> list[str]:
    text, name = page.read_text(encoding="utf-8"), rel(page)
    errors = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r} points outside "
              "the repository" for m in OUTSIDE.finditer(text)]
    resolved = []
    for target in link_targets(text):
        if SCHEME.match(target) or target.startswith("#"):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if path.startswith("/"):
            errors.append(f"{name}: link {target!r} is absolute; use a path relative to the page")
            continue
        dest = Path(os.path.normpath(page.parent / path))
        if dest != ROOT and ROOT not in dest.parents:
            errors.append(f"{name}: link {target!r} leaves the repository")
        elif not dest.exists():
            errors.append(f"{name}: link {target!r} points to no file")
        else:
            resolved.append(dest)
    errors += [f"{name}: link to {rel(p)!r}, a path git ignores (absent from a clone)"
               for p in sorted(_ignored(resolved))]
    return errors


def test_relative_links_resolve_inside_the_repo():
    errors = [e for page in pages() for e in link_errors(page)]
    assert errors == [], "\n".join(errors)
