"""The package's shape, enforced: the folder tree is the architecture diagram.

Imports point only downward through the layers below, never sideways between
subpackages of one layer; there are no import cycles; no module imports another's
private (``_name``) names; our own modules are imported at the top of a module, never
inside a function; no module passes 350 lines; and the public face (``__all__``)
resolves. Each rule is a test, so a change that breaks the shape fails CI naming the
module and the line.
"""

import ast
import importlib
from pathlib import Path

import lora_course

import pytest

PACKAGE = Path(lora_course.__file__).parent
MAX_LINES = 350

# Every top-level module or subpackage of lora_course, by layer. A module may import
# from a lower layer, or from its own unit; layer 0's single modules may also import
# each other (the import-cycle test keeps that acyclic).
LAYERS = {
    0: {"version", "blas", "tree", "atomic", "config", "notebook", "widgets", "limits", "safe_io"},
    1: {"model", "quant", "tokenizer"},
    2: {"checkpoint", "adapters", "data"},
    3: {"training"},
    4: {"recipes"},
}
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}
TOP = {"__init__", "__main__"}  # the public face and `python -m lora_course` sit above everything


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def our_imports(path: Path):
    """(line, imported module, names, at top level) for every import of lora_course."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body}
    me = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lora_course":
                    yield node.lineno, alias.name, [], id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != "lora_course":
                continue
            names = [a.name for a in node.names]
            # `from lora_course.training import resume` imports the module lora_course.training.resume
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in SOURCES] or [base]
            for target in targets:
                yield node.lineno, target, names, id(node) in top_level


GRAPH = {m: {t for _, t, _, _ in our_imports(p) if t != m} for m, p in SOURCES.items()}


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in SOURCES} - TOP
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_point_only_downward():
    bad = []
    for module, path in SOURCES.items():
        me = unit_of(module)
        if me in TOP:
            continue
        for line, target, _, _ in our_imports(path):
            them = unit_of(target)
            if them == me or them == "version":
                continue
            if them in TOP:
                bad.append(f"{path.name}:{line}: {module} imports the package face {target}")
            elif LAYER_OF[them] > LAYER_OF[me] or (LAYER_OF[them] == LAYER_OF[me] and LAYER_OF[me] != 0):
                bad.append(
                    f"{module}:{line} (layer {LAYER_OF[me]}, {me}) imports {target} (layer {LAYER_OF[them]})"
                )
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in SOURCES:
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(SOURCES):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_library_modules_import_modules_not_package_faces():
    """Inside the library, `from lora_course.model import Model` would run the facade
    (and everything it imports) and hide where Model lives: import the module."""
    bad = []
    for module, path in SOURCES.items():
        if unit_of(module) in TOP or module in PACKAGES:
            continue
        for line, target, names, _ in our_imports(path):
            if target in PACKAGES and target != "lora_course" and names:
                bad.append(f"{module}:{line}: from {target} import {', '.join(names)}")
            if target == "lora_course" and names:
                bad.append(f"{module}:{line}: from lora_course import {', '.join(names)}")
    assert not bad, "import the defining module instead:\n" + "\n".join(bad)


def test_no_private_names_cross_modules():
    bad = []
    for module, path in SOURCES.items():
        for line, target, names, _ in our_imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                bad.append(f"{module}:{line}: imports {', '.join(private)} from {target}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            for a in n.names
            if (n.module or "").startswith("lora_course")
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{module}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_our_modules_are_imported_at_the_top():
    bad = [
        f"{module}:{line}: imports {target} inside a function"
        for module, path in SOURCES.items()
        for line, target, _, top in our_imports(path)
        if not top
    ]
    assert not bad, "function-level imports of lora_course modules hide dependencies:\n" + "\n".join(bad)


def test_modules_are_small():
    long = {m: n for m, p in SOURCES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_public_names_resolve(package):
    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", [])
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{package}.__all__ names what it does not have: {missing}"
    assert len(names) == len(set(names)), f"{package}.__all__ repeats a name"


def test_the_public_face_is_large_and_stable():
    # The names notebooks and users import as lc.<name>; removing one breaks them.
    for name in (
        "load",
        "save",
        "apply_lora",
        "train",
        "generate",
        "fuse",
        "quantize_model",
        "finetune",
        "load_dataset",
        "TrainingArgs",
        "Model",
        "ModelArgs",
        "Tokenizer",
        "LoRALinear",
    ):
        assert name in lora_course.__all__, name
