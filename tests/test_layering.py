"""The package layering, enforced: which part of tpi may import which.

Every import statement in tpi/, master/ (installed as tpi.master) and worker/
(tpi.worker) is read with `ast`, lazy imports inside functions included, and
checked against the contracts below (the docs/architecture.md picture, as data).
import-linter would do the same, but its graph builder walks one directory per
root package and cannot see master/ and worker/ mapped into the tpi namespace.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"tpi": ROOT / "tpi", "tpi.master": ROOT / "master", "tpi.worker": ROOT / "worker"}


@dataclass(frozen=True)
class Contract:
    """Modules under `importer` may import nothing under `forbidden`, except `allowed`."""

    name: str
    importer: str
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()  # importer modules the contract does not apply to


CONTRACTS = (
    Contract(
        "the shared library never imports the master or the worker",
        "tpi",
        ("tpi.master", "tpi.worker"),
        exempt=("tpi.master", "tpi.worker"),
    ),
    Contract(
        "emulation is for the cluster launcher and benchmarks only",
        "tpi",
        ("tpi.emulation",),
        exempt=("tpi.emulation", "tpi.master.local_cluster", "tpi.master.link_relays"),
    ),
    Contract(
        "model math needs no storage, network, runtime, text or model sources",
        "tpi.model",
        ("tpi.storage", "tpi.comm", "tpi.runtime", "tpi.sources", "tpi.text", "tpi.cli"),
    ),
    Contract(
        "native kernels know pointers and shapes, nothing of models or nodes",
        "tpi.kernels",
        (
            "tpi.quant",
            "tpi.model",
            "tpi.storage",
            "tpi.comm",
            "tpi.runtime",
            "tpi.sources",
            "tpi.text",
            "tpi.planning",
        ),
    ),
    Contract(
        "weight formats sit below the model",
        "tpi.quant",
        ("tpi.model", "tpi.storage", "tpi.comm", "tpi.runtime", "tpi.sources", "tpi.text"),
    ),
    Contract(
        "process facts sit below everything",
        "tpi.system",
        ("tpi.quant", "tpi.model", "tpi.storage", "tpi.comm", "tpi.runtime", "tpi.sources"),
    ),
    Contract(
        "the wire knows bytes and tensors, not models, files or schedules",
        "tpi.comm",
        (
            "tpi.model",
            "tpi.quant",
            "tpi.storage",
            "tpi.runtime",
            "tpi.sources",
            "tpi.text",
            "tpi.discovery",
        ),
    ),
    Contract(
        "discovery finds workers and checks their secret; it knows no model, weights or text",
        "tpi.discovery",
        (
            "tpi.model",
            "tpi.quant",
            "tpi.kernels",
            "tpi.storage",
            "tpi.runtime",
            "tpi.sources",
            "tpi.text",
            "tpi.planning",
        ),
    ),
    Contract(
        "a service runs the worker by its command line: no model, network or worker code",
        "tpi.service",
        ("tpi.model", "tpi.comm", "tpi.runtime", "tpi.sources", "tpi.discovery", "tpi.planning"),
    ),
    Contract(
        "storage reads and writes weights; it does not run or send them",
        "tpi.storage",
        ("tpi.runtime", "tpi.comm", "tpi.sources", "tpi.text"),
    ),
    Contract(
        "text is tokenizer and templates only",
        "tpi.text",
        ("tpi.model", "tpi.quant", "tpi.storage", "tpi.comm", "tpi.runtime", "tpi.sources"),
    ),
    Contract(
        "model sources convert, find and pull models; they neither run them nor meet workers",
        "tpi.sources",
        ("tpi.runtime", "tpi.comm", "tpi.discovery"),
    ),
    Contract(
        "a rank's runtime does not know where models come from or how text looks",
        "tpi.runtime",
        ("tpi.sources", "tpi.text"),
    ),
    Contract("a worker never holds text", "tpi.worker", ("tpi.text", "tpi.sources")),
    Contract(
        "planning measures and predicts; it neither talks to nodes nor finds models",
        "tpi.planning",
        ("tpi.comm", "tpi.sources", "tpi.text", "tpi.cli"),
    ),
    Contract(
        "the engine runs each pass through a Forward: it never talks to workers",
        "tpi.master.engine",
        ("tpi.comm",),
    ),
    Contract(
        "the master's vocabulary embeds and chooses: it never starts a step",
        "tpi.master.vocab",
        ("tpi.comm",),
    ),
    Contract(
        "a forward pass reaches workers only through its topology's groups",
        "tpi.master.forward",
        ("tpi.comm",),
    ),
    Contract(
        "the groups of a step are arranged in one place, the topology",
        "tpi.master",
        ("tpi.comm.step_broadcast", "tpi.comm.star_master", "tpi.comm.head_gather"),
        exempt=("tpi.master.topology", "tpi.master.remote_stage", "tpi.master.pipeline"),
    ),
    Contract(
        "a worker's session admits, loads and serves; its steps' math is in worker.steps",
        "tpi.worker.session",
        ("tpi.model", "tpi.comm.star_worker"),
    ),
    Contract(
        "only the commands, the master and the worker use the planner",
        "tpi",
        ("tpi.planning",),
        exempt=("tpi.planning", "tpi.master", "tpi.worker", "tpi.cli"),
    ),
)


def module_name(package: str, base: Path, path: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports_of(module: str, source: str, is_package: bool) -> set[str]:
    """Every module `source` imports (absolute names; `from a import b` counts a.b too)."""
    out: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for c in CONTRACTS:
        for importer, targets in graph.items():
            if not under(importer, c.importer) or any(under(importer, e) for e in c.exempt):
                continue
            for t in sorted(targets):
                if any(under(t, f) for f in c.forbidden):
                    found.append(f"{importer} imports {t}: breaks '{c.name}'")
    return found


def project_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package, base in SOURCES.items():
        for path in sorted(base.rglob("*.py")):
            name = module_name(package, base, path)
            graph[name] = imports_of(name, path.read_text(), path.name == "__init__.py")
    return graph


def test_every_import_keeps_the_layering():
    assert violations(project_graph()) == []


def test_a_forbidden_import_is_caught():
    # The checker itself must fail on a breach, or the test above proves nothing.
    graph = project_graph()
    graph["tpi.model.layers"] = graph["tpi.model.layers"] | imports_of(
        "tpi.model.layers", "def f():\n    from ..comm.wire import Kind\n", False
    )
    graph["tpi.runtime.fake"] = imports_of("tpi.runtime.fake", "import tpi.master.engine\n", False)
    graph["tpi.master.engine"] = graph["tpi.master.engine"] | imports_of(
        "tpi.master.engine", "from tpi.comm.step_broadcast import StepBroadcaster\n", False
    )
    found = violations(graph)
    assert any("tpi.master.engine imports tpi.comm.step_broadcast" in v for v in found), found
    assert any("tpi.model.layers imports tpi.comm.wire" in v for v in found), found
    assert any("tpi.runtime.fake imports tpi.master.engine" in v for v in found), found


def test_every_package_is_installed():
    """pyproject lists packages by hand (master/ and worker/ are mapped): none may be missing."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        module_name(pkg, base, init)
        for pkg, base in SOURCES.items()
        for init in base.rglob("__init__.py")
    }
    assert found == listed
