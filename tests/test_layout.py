"""The package's import structure: no import circle in `effkernels` (kernel layer and model layer),
no import of our own modules inside a function, and the kernel layer never imports the model layer.
Built from the source files' import statements (ast), so it holds for every module, imported or not."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package folder -> dotted name (setup.py maps python/models to effkernels.models)
PACKAGES = {os.path.join(ROOT, "effkernels"): "effkernels", os.path.join(ROOT, "python", "models"): "effkernels.models"}


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    out = {}
    for folder, name in PACKAGES.items():
        for dirpath, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not os.path.islink(os.path.join(dirpath, d))]
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), folder)[:-3].replace(os.sep, ".")
                mod = name if rel == "__init__" else f"{name}.{rel.removesuffix('.__init__')}"
                out[mod] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _package_of(mod: str) -> str:
    return mod if MODULES[mod].endswith("__init__.py") else mod.rsplit(".", 1)[0]


def _targets(mod: str, node) -> set[str]:
    """Our modules an import statement depends on: `import a.b` -> a.b, `from a import b` -> a.b when b
    is a module, else a."""
    names = set()
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = _package_of(mod).split(".")
            base = base[:len(base) - (node.level - 1)]
            src = ".".join(base + ([node.module] if node.module else []))
        else:
            src = node.module or ""
        # `from pkg import sub` depends on pkg.sub; `from mod import name` on mod
        names = {f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names}
    found = set()
    for n in names:
        while n and n not in MODULES:  # `import effkernels.models.train` names effkernels too: keep the deepest
            n = n.rpartition(".")[0]
        if n:
            found.add(n)
    return found


def _imports(mod: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(our modules `mod` imports at module level, [(line, module) imported inside a function])."""
    tree = ast.parse(open(MODULES[mod]).read(), MODULES[mod])
    top, inner = set(), []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                t = _targets(mod, child) - {mod}
                if in_function:
                    inner.extend((child.lineno, x) for x in sorted(t))
                else:
                    top.update(t)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_walk_sees_both_layers():
    assert "effkernels.ops.adaln" in MODULES and "effkernels.models.train.trainer" in MODULES
    assert "effkernels.models.methods.base" in MODULES and len(MODULES) > 60


def test_no_import_circle():
    # every import counts, inside functions too, and a package's __init__ is a module like any other:
    # a submodule that imports its own package while the package imports it is a circle
    graph = {m: top | {t for _, t in inner} for m, (top, inner) in GRAPH.items()}
    assert _cycles(graph) == []


def test_no_import_of_our_modules_inside_a_function():
    found = [f"{os.path.relpath(MODULES[m], ROOT)}:{line} imports {t}" for m, (_, inner) in GRAPH.items()
             for line, t in inner]
    assert found == []


def test_the_kernel_layer_never_imports_the_model_layer():
    up = [f"{m} -> {t}" for m, (top, inner) in GRAPH.items() if not m.startswith("effkernels.models")
          for t in top | {t for _, t in inner} if t.startswith("effkernels.models")]
    assert up == []


def test_the_checker_sees_a_circle_and_an_inner_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = "import os\n\ndef f():\n    from .guidance import cfg_forward\n"
    tree = ast.parse(src)
    inner = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _targets("effkernels.models.backbone.network", inner[0]) == {"effkernels.models.backbone.guidance"}
