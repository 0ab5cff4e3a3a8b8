"""The package's dependency rules, read from the source: who may import whom.

The core (model, parallel engine, data, training run) never imports the analysis tools or the command
line; no module imports another's underscored names; no import cycles, lazy imports included (a cycle
hidden inside a function is still a cycle: the modules cannot be read or tested apart).
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "gptx"
CORE_PACKAGES = {"model", "parallel", "data", "training"}
OUTER_PACKAGES = {"analysis", "interop", "cli"}


def module_name(path: Path) -> str:
    """gptx/training/trainer.py -> training.trainer; gptx/config.py -> config."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def gptx_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(gptx module imported, names taken from it, line) for every import in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "gptx":
            module = node.module.partition(".")[2]
            names = []
            for alias in node.names:  # from gptx.training import checkpoint: a module, not a name
                submodule = f"{module}.{alias.name}" if module else alias.name
                if submodule in MODULES:
                    found.append((submodule, [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((module, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name.partition(".")[2], [], node.lineno) for a in node.names if a.name.startswith("gptx.")]
    return found


def package_of(module: str) -> str:
    return module.split(".")[0] if "." in module else ""


GRAPH = {name: {m for m, _, _ in gptx_imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}
CORE = {m for m in MODULES if package_of(m) in CORE_PACKAGES or package_of(m) == ""}


def test_the_rule_sets_name_real_modules():
    assert {package_of(m) for m in MODULES} == CORE_PACKAGES | OUTER_PACKAGES | {""}
    assert {"model.gpt", "model.layers", "parallel.engine", "parallel.pipeline", "data.tokens", "training.plan",
            "training.trainer", "parallel.host", "training.checkpoint", "config"} <= CORE
    assert all(m in MODULES for m, _, _ in gptx_imports(MODULES["training.trainer"])), "an import was misread"


def test_the_core_never_imports_analysis_interop_or_commands():
    wrong = [f"gptx/{name}: line {line} imports {m}" for name in sorted(CORE)
             for m, _, line in gptx_imports(MODULES[name]) if package_of(m) in OUTER_PACKAGES]
    assert not wrong, wrong


@pytest.mark.parametrize("folder", ["gptx", "tools", "launch"])
def test_no_module_takes_anothers_underscored_names(folder):
    wrong = [f"{path.relative_to(REPO)}:{line} takes {n} from gptx.{m}" for path in sorted((REPO / folder).rglob("*.py"))
             for m, names, line in gptx_imports(path) for n in names if n.startswith("_")]
    assert not wrong, wrong


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_module_over_450_lines_and_no_function_over_80():
    """Sizes a reader takes in at once: a longer module splits by concern, a longer function into steps."""
    long_modules = [f"gptx/{name}: {len(path.read_text().splitlines())} lines" for name, path in sorted(MODULES.items())
                    if len(path.read_text().splitlines()) > 450]
    long_functions = [f"gptx/{name}: {node.name} {node.end_lineno - node.lineno + 1} lines"
                      for name, path in sorted(MODULES.items()) for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 80]
    assert not long_modules + long_functions, long_modules + long_functions


def test_the_shipped_deepspeed_jsons_are_package_data():
    """A wheel carries gptx/ds_configs (pyproject's package data); ./ds_configs, what users pass and edit in a
    clone, is the same folder."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from gptx.parallel.ds_config import DS_CONFIG_DIR
    assert DS_CONFIG_DIR == PACKAGE / "ds_configs"
    shipped = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))
    assert {"cpu_fp32.json", "gpu_fp16.json", "gpu_bf16.json", "cpu_offload.json"} <= set(shipped)
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gptx"]
    assert all(any((DS_CONFIG_DIR / name).relative_to(PACKAGE).match(p) for p in patterns) for name in shipped)
    assert (REPO / "ds_configs").resolve() == DS_CONFIG_DIR


def test_the_readmes_module_map_names_every_module():
    """The map in README.md is the next engineer's way in: each package's entry names each of its modules,
    and gptx/cli's ("one module per command of launch/ and tools/") holds only the scripts' modules."""
    import re
    text = (REPO / "README.md").read_text()
    (block,) = [b for b in text.split("```") if b.lstrip().startswith("gptx/config.py")]
    entries, package = {}, None
    for line in block.strip().splitlines():
        start = re.match(r"gptx/(\w+)/", line)
        if start or package is None:
            package = start.group(1) if start else ""
        entries[package] = entries.get(package, "") + " " + line
    scripts = " ".join(p.read_text() for folder in ("launch", "tools") for p in (REPO / folder).glob("*.py"))
    missing = [name for name in MODULES if not (
        name.rpartition(".")[2] in re.findall(r"\w+", entries.get(name.rpartition(".")[0], ""))
        or name.startswith("cli.") and (name == "cli.common" or f"gptx.{name} import" in scripts))]
    assert not missing, f"README.md's module map does not name {missing}"


def test_gptx_modules_are_imported_at_the_top_outside_the_commands():
    """A module's dependencies show in its first lines. Only gptx/cli imports inside functions: a
    command names the accelerator before DeepSpeed's import probes for one, and answers --help and
    argument errors without importing torch (gptx/cli/__init__.py)."""
    nested = [f"{name}:{node.lineno}" for name, path in MODULES.items() if not name.startswith("cli.")
              for function in ast.walk(ast.parse(path.read_text()))
              if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function)
              if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gptx"]
    assert not nested, f"gptx imports inside functions: {sorted(set(nested))}"
