"""The package's layering, read from the source: stages are siblings over shared builders."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from methods.config import REPO_ROOT

PACKAGE = REPO_ROOT / "methods"
MODULES = sorted(PACKAGE.rglob("*.py"))


def imports(path: Path):
    """(module imported, names imported) for every import in ``path``, resolved to absolute
    ``methods.*`` names for relative imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [alias.name for alias in node.names]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_imports_a_private_name_of_another(path):
    private = [(module, name) for module, names in imports(path) for name in names
               if name.startswith("_") and not name.startswith("__") and module != "__future__"]
    assert not private, f"{module_name(path)} imports private names {private}"


def imported_modules(name: str):
    path = REPO_ROOT / (name.replace(".", "/") + ".py")
    return {module for module, _ in imports(path)} | {
        f"{module}.{n}" for module, names in imports(path) for n in names}


def test_evaluation_does_not_import_the_training_loop():
    assert not any(m == "methods.training" or m.startswith("methods.training.")
                   for m in imported_modules("methods.evaluation"))


#: Modules that read only configs and result files: no torch, no training or evaluation stage
#: (the workflow's table rules run them in the torch-free conda env).
TORCH_FREE = ["methods.tables", "methods.cost_plot", "methods.config", "methods.attack_specs",
              "methods.lt_metrics", "methods.masking_report", "methods.eps_curves",
              "methods.bench_tables", "methods.gpu_hours", "methods.published",
              "methods.published_build", "methods.plots", "methods.plot_data",
              "methods.plots_style", "methods.plots_sweeps", "methods.plots_training",
              "methods.plots_claims", "methods.claims", "methods.text_escape",
              "methods.paper_tables", "methods.paper_tables_band", "methods.paper_tables_measure",
              "methods.paper_tables_compare", "methods.paper_tables_render"]
STAGES = ("methods.training", "methods.evaluation", "methods.attacks")


def test_torch_free_modules_load_no_torch_when_imported():
    """The source check below, at run time: importing all of them (and what they import) in a
    fresh interpreter loads neither torch nor a stage."""
    code = (f"import sys, json; import {', '.join(TORCH_FREE)}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' "
            f"or m.startswith('torch.') or m in {STAGES!r})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", TORCH_FREE)
def test_renderers_and_config_import_neither_torch_nor_the_stages(name):
    mods = imported_modules(name)
    assert not any(m == "torch" or m.startswith("torch.") for m in mods), mods
    assert not mods & {"methods.training", "methods.evaluation", "methods.bench",
                       "methods.builders"}, mods
