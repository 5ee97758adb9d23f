"""docs/architecture.md stays true: the decode token's steps name a file and a
function that exist, and every source file the page names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
STEP = re.compile(r"^(\d+)\. `([\w/.]+\.py)` `([\w.]+)`", re.M)
MAX_STEPS = 12


def token_steps(text: str) -> list[tuple[int, str, str]]:
    section = text.split("## One decode token", 1)[1].split("\n## ", 1)[0]
    return [(int(n), path, name) for n, path, name in STEP.findall(section)]


def defined(path: Path, name: str) -> bool:
    """Whether `name` (a function, a class, or Class.method) is defined in `path`."""
    tree = ast.parse(path.read_text())
    scope: list[ast.stmt] = tree.body
    for part in name.split("."):
        found = next(
            (
                node
                for node in scope
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and node.name == part
            ),
            None,
        )
        if found is None:
            return False
        scope = found.body if isinstance(found, ast.ClassDef) else []
    return True


def test_one_decode_token_takes_a_dozen_named_steps_that_exist():
    steps = token_steps(DOC.read_text())
    assert 5 <= len(steps) <= MAX_STEPS, steps
    assert [n for n, _, _ in steps] == list(range(1, len(steps) + 1))
    missing = [
        f"{path} {name}"
        for _, path, name in steps
        if not (ROOT / path).is_file() or not defined(ROOT / path, name)
    ]
    assert missing == []


def test_a_step_naming_what_does_not_exist_is_caught():
    # The check itself must be able to fail.
    assert not defined(ROOT / "master" / "engine.py", "Engine.no_such_method")
    assert not defined(ROOT / "master" / "engine.py", "NoSuchClass")
    assert defined(ROOT / "master" / "engine.py", "Engine.step")
    fake = "## One decode token\n\n1. `master/engine.py` `Engine.step`: x\n2. `a/b.py` `f`: y\n"
    assert token_steps(fake) == [(1, "master/engine.py", "Engine.step"), (2, "a/b.py", "f")]


@pytest.mark.parametrize("ext", ["py", "c"])
def test_every_source_file_the_page_names_exists(ext):
    text = DOC.read_text()
    named = set(
        re.findall(r"`((?:tpi|master|worker|tests|benchmarks|docker)/[\w/]+\." + ext + ")", text)
    )
    assert named, "the page names no source file"
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []
