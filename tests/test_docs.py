"""The README and docs/ stay true: links resolve, the README stays short, and the snippets marked
runnable (a ``<!-- runnable -->`` line right before a fenced block) run as written, the way
submitit's test_documentation.py runs its docs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"<!-- runnable -->\s*\n```(\w+)\n(.*?)\n```", re.S)


def runnable_snippets():
    out = []
    for page in PAGES:
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            out.append(pytest.param(m.group(1), m.group(2), id=f"{page.relative_to(ROOT)}#{i}"))
    return out


def test_readme_is_short_and_the_docs_exist():
    assert (ROOT / "README.md").stat().st_size <= 10 * 1024
    for name in ("pipeline", "merging", "solver", "demo", "extending", "benchmarks"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_there_are_runnable_snippets():
    assert len(runnable_snippets()) >= 3


@pytest.mark.parametrize("lang,code", runnable_snippets())
def test_snippet_runs(lang, code, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if lang in ("bash", "sh"):
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    elif lang == "python":
        script = tmp_path / "snippet.py"
        script.write_text(code)
        res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    else:
        pytest.fail(f"runnable snippet in {lang!r}: only bash and python are run")
    assert res.returncode == 0, f"{code}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"


def test_readme_scale_figures_are_the_generated_ones():
    # the README quotes no scale figure by hand: its table is rendered from benchmarks/results
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import readme_figures

    assert readme_figures.main(["--check"]) == 0, "run python benchmarks/readme_figures.py"
    block = readme_figures.render()
    assert "| capture," in block and "per iteration" in block and "official diag. PCG" in block
