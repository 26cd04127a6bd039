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
        assert page.resolve() in reachable or page == DOCS / "index.md", (
            f"{page} is linked from neither the README nor docs/index.md"
        )
    for md in [README, *DOCS.rglob("*.md")]:
        for target in _links(md):
            assert target.exists(), f"{md}: broken link to {target}"


def test_generated_readme_tables_are_current() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "studies.readme", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr + done.stdout


def test_readme_quick_start_runs_as_written(tiny_export, tmp_path: Path) -> None:
    """The README's Python block, run in a fresh interpreter against a real export at the path it names."""
    export_dir, _manifest = tiny_export
    (tmp_path / "runs" / "main").mkdir(parents=True)
    os.symlink(export_dir, tmp_path / "runs" / "main" / "export")
    [code] = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith(
        "["
    )  # the labels of 3 utterances, then one line per live turn


def test_accuracy_page_is_written_from_run_metrics(tiny_run: Path, tmp_path: Path) -> None:
    """`studies.accuracy` turns runs' metrics.json into the results table; a folder without one is named."""
    import json

    from click.testing import CliRunner

    from studies.accuracy import main

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    out = tmp_path / "page"
    done = CliRunner().invoke(main, ["--run", f"tiny={tiny_run}", "--title", "tiny", "--out", str(out)])
    assert done.exit_code == 0, done.output
    [row, *_baselines] = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["model"] == "tiny" and row["test_wf1"] == 100 * metrics["test"]["weighted_f1"]
    assert "| tiny | 1 |" in out.with_suffix(".md").read_text()
    two = ["--run", f"a={tiny_run}", "--run", f"b={tiny_run}", "--title", "t", "--out", str(out)]
    assert CliRunner().invoke(main, two).exit_code == 0
    names = [r["model"] for r in json.loads(out.with_suffix(".json").read_text())["rows"]]
    assert names[:2] == ["a", "b"] and all(
        n.endswith(("(beside a)", "(beside b)")) for n in names[2:]
    )  # each run's baselines
    bad = CliRunner().invoke(main, ["--run", f"x={tmp_path}", "--title", "t", "--out", str(out)])
    assert bad.exit_code != 0 and "metrics.json" in bad.output


def test_the_product_speaks_only_of_itself() -> None:
    """No absolute path of a machine, no `../shared` citation and no word of how GPU machines are reached, in the
    packages, the studies, the docs, the scripts or the project file (tests may read local data; they are not here)."""
    banned = re.compile(
        r"/work/|/home/\w|\.\./shared|\bshared/(data|papers|docs)\b|\blent\b|\blending\b|device call|\bcarry:"
    )
    packages = ("cmath_train", "cmath_export", "cmath_runtime", "cmath_serve", "cmath_bench", "studies")
    files = [README, ROOT / "pyproject.toml", *DOCS.rglob("*.md"), *DOCS.rglob("*.json")]
    files += [*(ROOT / "scripts").glob("*.sh"), *(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))]
    found = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if banned.search(line)
    ]
    assert not found, "\n".join(found)
