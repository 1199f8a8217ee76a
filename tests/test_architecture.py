"""The house's arrows (../shared/notes/architecture.md): engines know no lungs, runtimes know no jobs, library code
never reaches the CLI, every module imports alone, and a Ray read or write task loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lungmask_kit"


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _path(module: str) -> Path:
    """The source file of a lungkit module (a package's __init__.py), or a path that does not exist."""
    base = PACKAGE.parent / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imports(module: str, top_only: bool = False) -> set[str]:
    """Every module `module` imports, inside functions too unless `top_only` (relative imports resolved)."""
    path = _path(module)
    if not path.is_file():
        return set()
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body if top_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _ours(module: str) -> set[str]:
    return {name for name in _imports(module) if name.split(".")[0] == "lungmask_kit"}


@pytest.mark.parametrize("layer, allowed", [
    # the engines run items through steps or stages; what an item is belongs to the job
    ("lungmask_kit.engines", ("lungmask_kit.errors",)),
    # a runtime runs a network on a batch; images, masks and manifests are above it
    ("lungmask_kit.runtimes", ("lungmask_kit.errors", "lungmask_kit.runtime", "lungmask_kit.runtimes",
                               "lungmask_kit.accel")),
])
def test_no_arrow_runs_back_up(layer, allowed):
    wrong = {m: sorted(n for n in _ours(m) if not n.startswith(allowed) and n != "lungmask_kit")
             for m in _modules() if m.startswith(layer)}
    assert not {m: names for m, names in wrong.items() if names}


def test_library_code_never_reaches_the_cli():
    wrong = {m: sorted(n for n in _imports(m) if n.split(".")[0] == "typer" or n.startswith("lungmask_kit.cli"))
             for m in _modules() if not m.startswith("lungmask_kit.cli")}
    assert not {m: names for m, names in wrong.items() if names}


def test_every_module_imports_alone():
    """Each module imported first, in a process where no other lungkit module was loaded before it: an import
    circle shows as a partially initialised module. (Third-party packages stay loaded between modules.)"""
    code = f"""
import importlib, sys
failed = []
for name in {_modules()!r}:
    for loaded in [m for m in sys.modules if m == "lungmask_kit" or m.startswith("lungmask_kit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{{name}}: {{type(err).__name__}}: {{err}}")
print("\\n".join(failed))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


def test_the_ray_read_and_write_units_load_no_torch():
    code = ("import sys, lungmask_kit.segment.steps, lungmask_kit.segment.ray, lungmask_kit.engines.ray; "
            "print(sorted(m for m in ('torch', 'ray', 'lungmask_kit.inference') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


# the packages the import rule (cli/app.py) lets a library module import inside a function: heavy to load or optional
HEAVY = {"torch", "torchvision", "segmentation_models_pytorch", "timm", "openvino", "ray", "jinja2", "matplotlib",
         "joblib", "pydicom", "highdicom", "pylibjpeg", "sklearn", "scipy", "skimage", "cv2", "pyarrow", "safetensors",
         "pycocotools", "threadpoolctl", "PIL"}


def _loads(module: str, seen: set[str] | None = None) -> set[str]:
    """The heavy packages importing `module` loads (its top-level imports, followed through lungkit's own)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    heavy = set()
    for name in _imports(module, top_only=True):
        root = name.split(".")[0]
        if root in HEAVY:
            heavy.add(root)
        elif root == "lungmask_kit":
            heavy |= _loads(name, seen)
    return heavy


def test_imports_inside_functions_defer_something():
    """Outside cli/, an import inside a function must put off loading a heavy or optional package its module does
    not load anyway; any other belongs at the module's top, where a reader sees what the module uses."""
    idle = []
    for module in _modules():
        if module.startswith("lungmask_kit.cli"):
            continue
        path = _path(module)
        loaded = _loads(module)
        for function in [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module] if node.module else []
                else:
                    continue
                for name in names:
                    root = name.split(".")[0]
                    defers = {root} - loaded if root in HEAVY else _loads(name) - loaded if root == "lungmask_kit" else set()
                    if not defers:
                        idle.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    assert not idle, "\n".join(idle)


def test_one_image_reader():
    """Files are read one way (`imaging.read_checked`: a regular file only, bounded, checked against the run's
    sha256 where it has one) and DICOM parsed one way (`dicom.read_dataset`)."""
    owners = {"read_regular_file": ("lungmask_kit.fileio", "lungmask_kit.imaging"), "dcmread": ("lungmask_kit.dicom",)}
    wrong = []
    for module in _modules():
        path = _path(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in owners and module not in owners[name]:
                    wrong.append(f"{module}:{node.lineno} {name}")
    assert not wrong
