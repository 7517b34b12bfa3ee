"""The layers import one way: model < conf < pipelines < workloads < cluster. A lower layer never imports a higher one,
not even inside a function; and composing a job's config does not load OpenCV."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("model", "conf", "pipelines", "workloads", "cluster")  # lowest first


def imported_packages(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the tree, those inside functions included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward_imports(layer: str) -> list[str]:
    rank = LAYERS.index(layer)
    wrong = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in imported_packages(ast.parse(path.read_text(), filename=str(path))):
            top = module.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > rank:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {module} ({top} is above {layer})")
    return wrong


def test_the_parser_sees_imports_inside_functions() -> None:
    tree = ast.parse("import os\ndef f():\n    from workloads.runtime import cli\n    import conf.train as t\n")
    assert imported_packages(tree) == [(1, "os"), (3, "workloads.runtime"), (4, "conf.train")]


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = [line for layer in LAYERS[:-1] for line in upward_imports(layer)]
    assert not wrong, "imports against model < conf < pipelines < workloads < cluster:\n" + "\n".join(wrong)


def test_composing_a_config_loads_no_opencv() -> None:
    """The schemas import `model` (their defaults come from its configs), and with it torch; OpenCV is the detectors'
    and the dedup embedders' alone."""
    code = ("import sys\nimport conf.train, conf.sweep, conf.preprocess, conf.dedup, conf.evaluate, conf.pairs\n"
            "print(sorted(m for m in ('cv2', 'ray', 'deepspeed') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", f"composing a config loaded {loaded.stdout.strip()}"
