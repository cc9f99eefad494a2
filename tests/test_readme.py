"""The file map (docs/layout.md) names every module of the package, every path it names
exists, and the README points to it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nanoseek"
LAYOUT = ROOT / "docs" / "layout.md"


def _rows() -> list[str]:
    """The paths in the first column of the tables (relative to nanoseek/)."""
    return re.findall(r"^\| `([^`]+)` \|", LAYOUT.read_text(), flags=re.M)


def _mapped(p: Path) -> bool:
    """Modules, the static files, and the __init__.py files that define something (the
    others only hand names on; their folder's caption is their docstring)."""
    if p.suffix != ".py":
        return p.parent.name == "static"
    if p.name != "__init__.py" or p.parent == PKG:
        return True
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in ast.parse(p.read_text()).body)


def test_file_map_lists_every_module():
    rows = set(_rows())
    files = [p for p in sorted(PKG.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    missing = [str(p.relative_to(PKG)) for p in files if _mapped(p) and str(p.relative_to(PKG)) not in rows]
    assert missing == [], f"docs/layout.md lacks {missing}"


def test_every_path_in_the_file_map_exists():
    gone = [r for r in _rows() if not (PKG / r).is_file()]
    assert gone == [], f"docs/layout.md names files that do not exist: {gone}"


def test_every_folder_has_its_table():
    headings = set(re.findall(r"^## `nanoseek/(.*)`$", LAYOUT.read_text(), flags=re.M))
    folders = {str(p.parent.relative_to(PKG)).replace(".", "") for p in PKG.rglob("*.py")
               if "__pycache__" not in p.parts}
    folders = {f"{f}/" if f else "" for f in folders}
    assert folders <= headings, sorted(folders - headings)


def test_the_readme_points_to_the_file_map():
    assert "(docs/layout.md)" in (ROOT / "README.md").read_text()
