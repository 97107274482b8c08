"""The package itself: every import is a declared dependency, no code is dead, the wheel works alone; and the
suite's own harness (tests/conftest.py's test groups)."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

SRC = REPO / "src" / "moaflow"


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values()
                                                    for r in extra]
    return {re.split(r"[\[=<>!~ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_import_in_the_package_is_a_declared_dependency():
    imported = set()
    for path in list(SRC.rglob("*.py")) + list((REPO / "workflow" / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"moaflow"}
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = {module: providers.get(module) for module in third_party
                  if not {d.lower().replace("_", "-") for d in providers.get(module, [module])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_no_dead_code(tmp_path):
    from moaflow.steps import STEPS

    # The rules run these by name (moaflow.steps) and call moaflow.layout's paths in .smk files, which
    # vulture cannot read; Keras reads `trainable` (a layer attribute moaflow sets).
    used_by_rules = {name for rules in (REPO / "workflow").rglob("*.smk")
                     for name in re.findall(r"\blayout\.(\w+)\(", rules.read_text())}
    steps = tmp_path / "steps_whitelist.py"
    steps.write_text("\n".join([f"import {target.partition(':')[0]}\n{target.replace(':', '.')}"
                                for target in STEPS.values()]
                               + ["import moaflow.layout"] + [f"moaflow.layout.{name}" for name in sorted(used_by_rules)]))
    result = subprocess.run([str(BIN / "vulture"), str(SRC), str(REPO / "workflow" / "scripts"), str(REPO / "tests"),
                             str(steps), "--min-confidence", "60", "--ignore-names",
                             "on_epoch_begin,pytestmark,trainable"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_wheel_installs_without_the_source_tree_and_runs_a_step(tmp_path):
    """Built and installed like a user's non-editable install: the package data (schemas, tables) comes along,
    and a step runs from a folder with no source tree in reach."""
    import shutil

    source = tmp_path / "source"   # a copy: building writes build/ beside the sources, never into the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([str(BIN / "python"), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    *map(str, wheels.glob("moaflow-*.whl"))], check=True, capture_output=True)
    # The dependencies come from this environment's site-packages (a plain path: its editable moaflow is not
    # picked up, since .pth files are read only in site directories).
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dependencies = next(p for p in sys.path if p.endswith("site-packages"))
    (Path(site) / "moaflow_test_dependencies.pth").write_text(dependencies + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    check = ("import moaflow, sys; from moaflow import config; from moaflow.learn.presets import hyperparameters;"
             "config.defaults(); hyperparameters('final', 'resnet50'); print(moaflow.__file__)")
    where = subprocess.run([str(python), "-c", check], cwd=work, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    from importlib import resources

    predictions = resources.files("moaflow") / "data" / "kensert2019_predictions.csv"
    step = subprocess.run([str(venv / "bin" / "moaflow"), "evaluate-predictions", "--predictions", str(predictions),
                           "--out-dir", str(work / "out")], cwd=work, capture_output=True, text=True)
    assert step.returncode == 0, step.stderr[-2000:]
    assert (work / "out" / "accuracy.csv").is_file()


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in SRC.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


def test_the_suite_stops_when_pytest_xdist_loses_the_cluster_group():
    """pytest 9.2 made pytest-xdist's loadgroup ignore groups silently: two clusters would then run at once."""
    from types import SimpleNamespace

    from tests import conftest

    node = SimpleNamespace(config=SimpleNamespace(getoption=lambda name: "loadgroup"))
    with pytest.raises(pytest.exit.Exception, match="did not group the cluster's tests"):
        conftest.pytest_xdist_node_collection_finished(node, ["tests/workflow/test_slurm.py::test_up",
                                                              "tests/test_logs.py::test_lines"])
    conftest.pytest_xdist_node_collection_finished(node, ["tests/workflow/test_slurm.py::test_up@cluster",
                                                          "tests/test_logs.py::test_lines"])   # grouped: goes on
