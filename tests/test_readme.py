"""The README's file map ("Where things are") names every module of the package."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_file_map_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Where things are"):]
    section = section[:section.index("\n## ", 1)]
    pkg = ROOT / "nanoseek"
    missing = [str(p.relative_to(pkg)) for p in sorted(pkg.rglob("*.py"))
               if not (p.name == "__init__.py" and p.parent.name not in ("nanoseek", "cli", "config", "serve"))
               and f"`{p.relative_to(pkg)}`" not in section]
    assert missing == [], f"README's file map lacks {missing}"
