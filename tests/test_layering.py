"""kpro's imports point downward only: methods -> train -> model -> ops, and nothing imports in a circle.

Every module of kpro belongs to one unit of LAYERS. A module may import a unit of a lower layer, or
another module of its own unit (inside one package); anything else, a method importing another method
included, is a violation. The imports are read from the source (function-level imports too: a lazy
import is still a dependency), so the test needs no import of kpro itself.
"""
import ast
from pathlib import Path

KPRO = Path(__file__).resolve().parents[1] / "kpro"

# Lowest first. A unit is a module or a package (all its modules).
LAYERS = [
    ("kpro._torchrun", "kpro._numbers"),  # torchrun's environment, without torch; what an integer and a seed are
    ("kpro._cuda_build", "kpro.errors", "kpro.cli_args", "kpro._signals", "kpro._spawn"),
    ("kpro._safetensors",),  # headers without torch: info's and the streamed expand's
    ("kpro._run_lock",),  # one run per output directory: fit's and the demo's
    ("kpro._files",),  # atomic files and directories: a directory is swapped whole, holding the runs inside it
    ("kpro._run_record",),  # which command's run an --out holds (kpro_run.json)
    ("kpro._digests",),  # SHA-256 of tensors' values: base fingerprints, the frozen weights a checkpoint leaves out
    ("kpro.ops",),
    ("kpro.config",),
    ("kpro.chat_template",),  # jinja2 rendering of Hugging Face chat templates, the tokenizers'
    ("kpro.rope", "kpro.tokenizer"),
    ("kpro._tokenize_worker",),  # `kpro tokenize`'s worker processes: the tokenizer without torch
    ("kpro.model", "kpro.lora"),
    ("kpro.generation", "kpro.distributed"),
    ("kpro.checkpoint",),
    ("kpro.adapters", "kpro.convert"),  # convert writes checkpoints as kpro.checkpoint lays them out
    ("kpro.train",),
    ("kpro.expansion", "kpro.internalize", "kpro.bitune"),  # the methods: none imports another
    ("kpro.instruct",),  # the old name of kpro.bitune: that module itself
    ("kpro.demo",),  # uses the library, never the command line
    ("kpro.cli",),
    ("kpro.__main__", "kpro"),
    ("kpro.integrations",),  # optional bridges to other libraries: above kpro itself, which never imports them
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(KPRO.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (KPRO.parent / name.replace(".", "/") / "__init__.py").is_file()


def kpro_imports(path: Path) -> set[str]:
    """The kpro modules `path` imports, anywhere in the file, resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "kpro")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kpro":
                continue
            for alias in node.names:  # `from . import ops` imports the module kpro.ops
                sub = f"{target}.{alias.name}"
                is_module = is_package(sub) or (KPRO.parent / (sub.replace(".", "/") + ".py")).is_file()
                found.add(sub if is_module else target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): kpro_imports(path) for path in sorted(KPRO.rglob("*.py"))}


def unit_of(module: str) -> str | None:
    """The longest LAYERS unit that is `module` or a package holding it (`kpro` holds only its __init__)."""
    if module == "kpro":
        return module
    parts = module.split(".")
    for cut in range(len(parts), 1, -1):
        if ".".join(parts[:cut]) in RANK:
            return ".".join(parts[:cut])
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        here = unit_of(module)
        if here is None:
            problems.append(f"{module} belongs to no unit of LAYERS: place it in the layering")
            continue
        for target in sorted(targets):
            there = unit_of(target)
            if there == here and module != "kpro":
                continue
            if there is None or RANK[there] >= RANK[here]:
                problems.append(f"{module} imports {target} ({there}, layer {RANK.get(there)}), not below its own "
                                f"unit {here} (layer {RANK[here]})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among kpro's modules; importing a package means importing its __init__. A module that
    names itself (a worker process's entry point, say) is no cycle."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ()) - {node}):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_every_import_points_down_the_layers():
    graph = import_graph()
    assert len(graph) > 60 and graph["kpro.model"] >= {"kpro.ops", "kpro.config", "kpro.rope"}  # the parser sees imports
    assert upward_imports(graph) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_are_for():
    graph = import_graph()
    back_arrow = {**graph, "kpro.checkpoint": graph["kpro.checkpoint"] | {"kpro.train.distributed"}}
    assert any("kpro.checkpoint imports kpro.train.distributed" in p for p in upward_imports(back_arrow))
    method_to_method = {**graph, "kpro.expansion.posttrain": graph["kpro.expansion.posttrain"] | {"kpro.bitune.data"}}
    assert any("kpro.expansion.posttrain imports kpro.bitune.data" in p for p in upward_imports(method_to_method))
    demo_to_cli = {**graph, "kpro.demo.basics": graph["kpro.demo.basics"] | {"kpro.cli"}}
    assert upward_imports(demo_to_cli)
    circle = {**graph, "kpro.ops.errors": graph["kpro.ops.errors"] | {"kpro.ops.backend"}}
    assert any(c[0] == c[-1] and "kpro.ops.errors" in c for c in cycles(circle))
    unplaced = {**graph, "kpro.newthing": set()}
    assert any("kpro.newthing belongs to no unit" in p for p in upward_imports(unplaced))


def test_method_packages_read_alike():
    """Each method package lists its files in its docstring and keeps its CLI subcommand in command.py."""
    for method in ("expansion", "internalize", "bitune"):
        package = KPRO / method
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        files = sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py")
        assert "command.py" in files, method
        assert [f for f in files if f not in doc] == [], f"kpro/{method}/__init__.py does not list every file"
        assert "add_parsers" in (package / "command.py").read_text(), method
