"""The README and docs/ pages stay short where they promise to and true to the code:
README.md fits a newcomer's first read, every relative link (and #anchor) resolves,
and every `tpi <command> --flag` they show is an option that command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from tpi.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 260

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`]+)`")
SHELL_FENCES = {"bash", "sh", "shell"}
COMMAND_END = {"&&", "||", "|", ";"}


def _without_code(text: str) -> str:
    return SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    return [
        t
        for t in LINK.findall(_without_code(page.read_text()))
        if not re.match(r"[a-z]+:", t)  # http:, https:, mailto: are not files here
    ]


def test_readme_is_a_first_read_not_a_reference():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move detail to docs/"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_something_that_exists(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def _shell_lines(text: str) -> list[str]:
    """Commands in shell code blocks (continuation lines joined) and inline code spans
    that start with `tpi` (or `.venv/bin/tpi`)."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang.strip() in SHELL_FENCES:
            lines += body.replace("\\\n", " ").splitlines()
    lines += [s for s in SPAN.findall(FENCE.sub("", text)) if re.match(r"(\S*/)?tpi ", s)]
    return lines


def _tpi_invocations(line: str) -> list[list[str]]:
    """The words after each `tpi` (or `.../tpi`) in a shell line, up to the end of
    that command."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: not a command
        return []
    out = []
    for i, w in enumerate(words):
        if w == "tpi" or w.endswith("/tpi"):
            rest = []
            for v in words[i + 1 :]:
                if v in COMMAND_END:
                    break
                rest.append(v)
            out.append(rest)
    return out


def _options(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for p in command.params:
        if isinstance(p, click.Option):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def _unknown_flags(words: list[str]) -> list[str]:
    """Flags in `words` (a command line after `tpi`) that the command they follow lacks."""
    group: click.Group = cli
    command: click.Command | None = None
    problems = []
    for w in words:
        sub = group.get_command(click.Context(group), w) if group is not None else None
        if command is None or (sub is not None and isinstance(command, click.Group)):
            if sub is None:
                problems.append(f"no command {w!r}")
                break
            command = sub
            group = sub if isinstance(sub, click.Group) else None
            continue
        if re.match(r"--?[a-zA-Z]", w):
            # "--pp/--stages" in prose means either flag
            for flag in w.split("=")[0].split("/"):
                if flag.startswith("-") and flag not in _options(command):
                    problems.append(f"{command.name} has no {flag}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_tpi_flag_shown_is_a_real_option(page):
    problems = []
    for line in _shell_lines(page.read_text()):
        for words in _tpi_invocations(line):
            problems += [f"{p} (in: {line.strip()})" for p in _unknown_flags(words)]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_flag_check_catches_what_it_should():
    assert _unknown_flags(["chat", "--workers", "a:1", "--shares", "2,1"]) == []
    assert (
        _unknown_flags(["cluster", "--workers", "3", "--mem-limit", "2GB", "chat", "--pp", "2"])
        == []
    )
    assert _unknown_flags(["worker", "--no-accept-push", "-q"]) == []
    assert _unknown_flags(["chat", "--no-such-flag"]) == ["chat has no --no-such-flag"]
    assert _unknown_flags(["cluster", "--workers", "2", "chat", "--mem-limit", "1GB"]) == [
        "chat has no --mem-limit"
    ]
    assert _unknown_flags(["split", "--pp/--stagez"]) == ["split has no --stagez"]
    assert _unknown_flags(["chatter"]) == ["no command 'chatter'"]


def test_the_link_check_reads_anchors_as_github_does():
    assert _slug("tpi vs llama.cpp") == "tpi-vs-llamacpp"
    assert _slug("Without docker: `tpi cluster`") == "without-docker-tpi-cluster"
    assert _slug("The cluster's own cost") == "the-clusters-own-cost"
