"""What each distribution may import: the product packages never import a benchmark or a
benchmark-only dependency (checked on their source, module by module), and `specedge
bench` comes from the `specedge-bench` distribution alone."""

import ast
from importlib.metadata import entry_points

import pytest

from tests.conftest import REPO

PRODUCT = {"specedge": REPO / "libs" / "specedge", "specedge_gateway": REPO / "gateway" / "specedge_gateway",
           "specedge_scheduler": REPO / "scheduler" / "specedge_scheduler",
           "specedge_verifier": REPO / "verifier" / "specedge_verifier",
           "edge_agent": REPO / "edge-agent" / "edge_agent"}
BENCH_ONLY = {"specedge_bench", "psutil", "tqdm", "matplotlib"}


def imported(path) -> set[str]:
    """Top-level names of every module a source file imports (lazily inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(PRODUCT))
def test_product_packages_import_nothing_of_the_benchmarks(package):
    found = {str(path.relative_to(REPO)): bad for path in sorted(PRODUCT[package].rglob("*.py"))
             if (bad := imported(path) & BENCH_ONLY)}
    assert not found, found
    assert not list(PRODUCT[package].rglob("bench*.py")) and not list(PRODUCT[package].rglob("simulator.py"))


def test_the_bench_commands_come_from_the_bench_distribution():
    commands = {ep.name: ep for ep in entry_points(group="specedge.commands")}
    assert {name: commands[name].dist.name for name in ("bench", "bench-verify")} == \
        {"bench": "specedge-bench", "bench-verify": "specedge-bench"}
