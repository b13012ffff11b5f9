"""Run every code block of README.md and docs/*.md that claims to run, so none of them can rot.

The marker: a fenced block whose info string is ``python run`` runs on 2 gloo ranks; ``python run ranks=N``
picks the world size (1 to 4). Any other block (``python``, ``bash``, ...) is shown, not run. A run block
is executed as it stands, on every rank of a `tests/dist.py` group, in fresh globals, with:

* the default process group already initialized (gloo), so a block written for torchrun guards its
  ``dist.init_process_group("gloo")`` with ``if not dist.is_initialized():``;
* the working directory set to an empty directory shared by the ranks of that block, so a block may
  write ``ckpt/`` or ``model/`` relative to it.

A block passes when it raises nothing on any rank; blocks assert what they claim (``torch.testing``).
Besides, every docs page must open with a run block (its first code block), the README must stay within
its line budget, its test command must be the one `.ci/run` runs, and every relative link of a page must
point to a file that exists.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from dist import run_ranks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
GENERATED = {"docs/model-support.md"}  # written by tests/model_census.py --write; only linked
README_LINES = 120

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
_RUN = re.compile(r"^python\s+run(?:\s+ranks=(\d+))?\s*$")


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, code, line number) of each fenced block of a Markdown text."""
    return [
        (m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in _FENCE.finditer(text)
    ]


def run_blocks() -> list:
    params = []
    for doc in DOCS:
        for info, code, line in code_blocks((ROOT / doc).read_text()):
            m = _RUN.match(info)
            if m:
                ranks = int(m.group(1) or 2)
                params.append(pytest.param(doc, line, ranks, code, id=f"{doc}:{line}"))
    return params


def _exec_block(code: str, name: str, workdir: str) -> None:
    """Run one block on this rank (module level: tests/dist.py sends it by reference)."""
    import torch.distributed as dist

    rank_dir = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(code, name, "exec"), {"__name__": "__docs__"})  # noqa: S102 - the docs blocks are the test
        dist.barrier()  # every rank done before the next block reuses the group
    finally:
        os.chdir(rank_dir)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("doc, line, ranks, code", run_blocks())
def test_block_runs(doc: str, line: int, ranks: int, code: str) -> None:
    assert 1 <= ranks <= 4, f"{doc}:{line}: ranks={ranks}, the harness runs 1 to 4"
    with tempfile.TemporaryDirectory() as workdir:
        run_ranks(_exec_block, ranks, code, f"{doc}:{line}", workdir, timeout_s=240)


def test_marker_parsed() -> None:
    text = "x\n```python run\na = 1\n```\n```python run ranks=4\nb\n```\n```python\nc\n```\n"
    infos = [(info, bool(_RUN.match(info))) for info, _, _ in code_blocks(text)]
    assert infos == [("python run", True), ("python run ranks=4", True), ("python", False)]


@pytest.mark.parametrize("doc", [d for d in DOCS if d not in GENERATED])
def test_page_opens_with_a_run_block(doc: str) -> None:
    blocks = code_blocks((ROOT / doc).read_text())
    assert blocks, f"{doc} has no code block"
    runnable = [line for info, _, line in blocks if _RUN.match(info)]
    if doc == "README.md":
        assert len(runnable) >= 2, (
            "README.md: the two examples (modules by hand, a Hugging Face model) must run"
        )
    else:
        assert _RUN.match(blocks[0][0]), (
            f"{doc}: its first code block (line {blocks[0][2]}) must be a run block"
        )


def test_readme_budget_and_ci_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= README_LINES, (
        f"README.md has {readme.count(chr(10))} lines, budget {README_LINES}"
    )
    commands = [
        c
        for info, code, _ in code_blocks(readme)
        if info == "bash"
        for c in code.splitlines()
        if "python -m pytest" in c
    ]
    assert len(commands) == 1, "README.md: one test command in a bash block"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci, ".ci/run must run the README's test command verbatim"


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_exist(doc: str) -> None:
    page = ROOT / doc
    missing = [
        t for t in _LINK.findall(page.read_text()) if "://" not in t and not (page.parent / t).exists()
    ]
    assert not missing, f"{doc} links to missing files: {missing}"
