"""The package itself: every import is a declared dependency, and no code is dead."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib

from .conftest import BIN, REPO

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


def test_no_dead_code():
    result = subprocess.run([str(BIN / "vulture"), str(SRC), str(REPO / "workflow" / "scripts"), str(REPO / "tests"),
                             "--min-confidence", "60", "--ignore-names", "on_epoch_begin,formatter_class,pytestmark"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
