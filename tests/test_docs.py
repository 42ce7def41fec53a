"""The Python examples of the README and the documentation run as written.

Every ```python block of a page runs, in order, in one namespace per page; all
pages run in one fresh interpreter, so that names the pages register do not
leak into the other tests. Blocks that include files (``--8<--``) are skipped:
those files are tested by tests/test_plugins.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    "README.md",
    "docs/index.md",
    "docs/getting-started.md",
    "docs/concepts.md",
    "docs/solvers.md",
    "docs/plugins.md",
    "docs/optimisation.md",
]

RUNNER = """
import contextlib, io, json, sys, traceback, warnings
import implicit
warnings.simplefilter("error", implicit.ConvergenceWarning)
results = {}
for page, blocks in json.load(sys.stdin).items():
    namespace = {"__name__": "__doc_example__"}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                exec(compile(block, page, "exec"), namespace)
        results[page] = {"ok": True, "stdout": out.getvalue()}
    except Exception:
        results[page] = {"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()}
print(json.dumps(results))
"""


def _blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return [b for b in blocks if "--8<--" not in b]


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    pages = {p: _blocks(p) for p in PAGES if (ROOT / p).is_file()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUNNER)],
        input=json.dumps(pages),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, results: dict[str, dict[str, object]]) -> None:
    assert _blocks(page), f"{page} has no Python example"
    res = results[page]
    assert res["ok"], f"{page}:\n{res.get('error')}"


def test_getting_started_numbers_are_the_ones_quoted(results: dict[str, dict[str, object]]) -> None:
    out = str(results["docs/getting-started.md"]["stdout"])
    hooks = float(re.search(r"one hook per variable: relative error (\S+)", out).group(1))  # type: ignore[union-attr]
    joint = float(re.search(r"implicit: relative error (\S+)", out).group(1))  # type: ignore[union-attr]
    assert f"{hooks:.1e}" == "1.6e-01"  # the figure quoted in the page and the README
    assert joint < 1e-8
    text = (ROOT / "docs/getting-started.md").read_text(encoding="utf-8")
    assert "off by 16 %" in text and "16 % off" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_concepts_root_example_matches_the_closed_form(results: dict[str, dict[str, object]]) -> None:
    out = str(results["docs/concepts.md"]["stdout"])
    assert "tensor([2.0000, 3.0000]" in out and "tensor([0.0833, 0.0370]" in out
