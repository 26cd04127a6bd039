"""The README and docs as a product: short, no run history, every page reachable, generated tables current, and the
quick start runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _links(md: Path) -> set[Path]:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text(encoding="utf-8"))
    return {(md.parent / t).resolve() for t in targets if not re.match(r"[a-z]+://", t)}


def test_readme_is_a_product_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 220
    assert text.startswith("# cmath\n\n```bash\nbash scripts/main.sh")  # the two commands first
    for history in (r"\b(this|last|next|previous|earlier) (round|session)", r"\bround \d", r"\bissues?\b"):
        assert not re.search(history, text, re.I), history
    assert not re.search(r"\b[0-9a-f]{7,40}\b", text.replace("sha256", "")), "a commit hash in the README"


def test_every_docs_page_is_linked_and_every_link_resolves() -> None:
    reachable = _links(README) | _links(DOCS / "index.md")
    for page in DOCS.rglob("*.md"):
        assert page.resolve() in reachable or page == DOCS / "index.md", f"{page} is linked from neither the README nor docs/index.md"
    for md in [README, *DOCS.rglob("*.md")]:
        for target in _links(md):
            assert target.exists(), f"{md}: broken link to {target}"


def test_generated_readme_tables_are_current() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.readme", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


def test_readme_quick_start_runs_as_written(tiny_export, tmp_path: Path) -> None:
    """The README's Python block, run in a fresh interpreter against a real export at the path it names."""
    export_dir, _manifest = tiny_export
    (tmp_path / "runs" / "main").mkdir(parents=True)
    os.symlink(export_dir, tmp_path / "runs" / "main" / "export")
    [code] = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith("[")  # the labels of 3 utterances, then one line per live turn
