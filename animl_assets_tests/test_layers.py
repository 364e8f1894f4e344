"""The package's layers: imports point down only, and core/ knows neither Dagster nor the layers above it.
Read from the source (every import, function-local ones included), so a new upward import fails here."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "animl_assets"
# lowest first; a module may import its own layer and those below it
LAYERS = ["core", "core.ingest", "core.detect", "core.dataset", "core.ml", "core.registry", "core.review",
          "settings", "k8s", "runs", "resources", "train_worker", "assets", "lineage", "automation", "definitions",
          "registration", "cli"]
MAX_LINES = 80


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    """The index of the deepest layer that names ``module`` (``animl_assets.core.ml.training`` -> core.ml)."""
    name = module.removeprefix("animl_assets.")
    return max(i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + "."))


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def test_imports_point_down_only():
    upward = []
    for module, path in _modules().items():
        if module == "animl_assets":
            continue
        for imported in _imports(path):
            if imported.startswith("animl_assets.") and imported.removeprefix("animl_assets.") not in ("", "core"):
                target = imported
                while target not in _modules() and "." in target:  # `from x import name`: the module x
                    target = target.rsplit(".", 1)[0]
                if _layer(target) > _layer(module):
                    upward.append(f"{module} imports {imported}")
    assert upward == []


def test_core_imports_no_dagster_and_nothing_above_it():
    offending = [f"{module}: {imported}" for module, path in _modules().items() if module.startswith("animl_assets.core")
                 for imported in _imports(path)
                 if imported.split(".")[0] in ("dagster", "dagster_aws", "dagster_pipes", "dagster_mlflow")
                 or (imported.startswith("animl_assets.") and not imported.startswith("animl_assets.core"))]
    assert offending == []


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > MAX_LINES:
                    long.append(f"{module}.{node.name}: {node.end_lineno - start + 1} lines")
    assert long == []


def test_environment_variables_are_named_in_settings_only():
    """Each variable the project reads or sets is spelled once, in settings.py's table; elsewhere only in
    prose (docstrings, comments, messages), never as a key of os.environ."""
    spelled = []
    for module, path in _modules().items():
        if module == "animl_assets.settings":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                owner = ast.unparse(node.func.value)
                if owner in ("os.environ", "env", "environ") and isinstance(node.args[0], ast.Constant):
                    spelled.append(f"{module}: {ast.unparse(node)}")
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" and isinstance(
                    node.slice, ast.Constant):
                spelled.append(f"{module}: {ast.unparse(node)}")
    assert spelled == []


def test_the_definitions_and_the_cli_load_without_pytorch():
    """Every CLI command, code server, sensor tick and step process loads the Definitions: PyTorch, torchvision
    and scikit-learn (seconds of imports) come in only when an ML step runs."""
    probe = ("import sys, animl_assets.definitions, animl_assets.cli, animl_assets.lineage;"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'sklearn', 'timm'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
