"""The package's layout by role: the stages DVC runs (``transferlab.stages``), the user's tools
(``transferlab.tools``) and the library they share (the package's root). The library never imports a stage
or a tool, nothing imports itself, and each dvc.yaml stage depends on exactly the code it runs."""

from __future__ import annotations

import ast
import subprocess
import sys

import yaml

from conftest import PROJECT

PACKAGE = PROJECT / "src/transferlab"
PIPELINES = ("dvc.yaml", "efficiency/dvc.yaml")  # the main comparison, and the data-efficiency curve
ROLES = ("stages", "tools")


def module_path(module: str):
    """``stages.probe`` -> src/transferlab/stages/probe.py (a package: its __init__.py)."""
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def all_modules() -> list[str]:
    return sorted(
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" or path.parent != PACKAGE
    )


def direct_imports(module: str) -> set[str]:
    """The transferlab modules ``module`` imports itself, anywhere in it (function-level imports too)."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(module_path(module).read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package[: len(package) - (node.level - 1)]
        names = [node.module] if node.module else [alias.name for alias in node.names]
        found |= {".".join([*base, *name.split(".")]) for name in names}
    return found


def package_imports(module: str) -> set[str]:
    """The transferlab modules ``module`` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += direct_imports(name)
    return seen


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """Each pipeline stage's module (``stages.prepare``) and deps (a foreach or matrix stage: its template),
    by ``<pipeline file>:<stage>``."""
    found = {}
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((PROJECT / pipeline).read_text())["stages"].items():
            stage = stage.get("do", stage)
            module = stage["cmd"].split()[2].removeprefix("transferlab.")
            found[f"{pipeline}:{name}"] = (module, stage["deps"])
    return found


def test_every_stage_depends_on_the_code_it_runs():
    """A change to any module a stage imports re-runs that stage (dvc.yaml deps),
    and nothing listed is missing."""
    for name, (module, deps) in stage_commands().items():
        code = {dep for dep in deps if dep.startswith("src/")}
        expected = {str(module_path(m).relative_to(PROJECT)) for m in package_imports(module)}
        assert code == expected, (name, sorted(code ^ expected))
        assert all((PROJECT / dep).exists() for dep in code)


def test_the_library_never_imports_a_stage_or_a_tool_and_stages_no_tool():
    """What a stage runs is library code (a change to a tool re-runs no stage); tools use the library too."""
    for module in all_modules():
        role = module.split(".")[0] if module.split(".")[0] in ROLES else "library"
        reached = {m.split(".")[0] for m in direct_imports(module)} & set(ROLES)
        allowed = {"library": set(), "stages": {"stages"}, "tools": {"tools"}}[role]
        assert reached <= allowed, f"{module} ({role}) imports {sorted(reached - allowed)}"


def test_the_package_folders_hold_no_code():
    """Their __init__.py files are a docstring only, so that they need not be any stage's dependency."""
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), init


def test_each_stage_module_is_one_dvc_stage_and_each_dvc_stage_runs_one():
    modules = {module for module, _ in stage_commands().values()}
    assert modules == {m for m in all_modules() if m.startswith("stages.") and m != "stages"}


def test_the_package_has_no_import_cycle():
    """Imports anywhere in a module (function-level ones included) form no cycle."""
    for module in all_modules():
        reachable = set().union(*(package_imports(m) for m in direct_imports(module) - {module}), set())
        assert module not in reachable, f"{module} imports itself through {sorted(direct_imports(module))}"


def test_entry_points_start_without_the_heavy_libraries():
    """`transferlab --help`, a CLI error and a stage's first line come before torch, timm,
    sklearn or captum load."""
    entry_points = ["tools.cli", *(module for module, _ in stage_commands().values())]
    code = (
        f"import sys, transferlab.{', transferlab.'.join(entry_points)}\n"
        "heavy = [m for m in ('torch', 'timm', 'torchvision', 'sklearn', 'captum', 'onnxruntime',"
        " 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() in ("", "matplotlib"), (
        result.stdout
    )  # compare draws with matplotlib (under a second)
