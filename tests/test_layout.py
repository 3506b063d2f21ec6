"""The house rules of the layout, checked on the source: layers, doors, circles, file sizes.

Imports are read with `ast`, inside functions too, so a circle hidden behind a local
import is still a circle.
"""
import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "tuili"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every tuili module `path` imports, anywhere in the file, resolved to absolute names."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tuili"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tuili"):
                continue
            found.add(target)
            for a in node.names:  # `from . import x` may name a submodule
                found.add(f"{target}.{a.name}")
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in imports_of(p) if i in files and i != m} for m, p in files.items()}


def test_no_import_circles_even_inside_functions():
    g = graph()
    # A package's __init__ re-exporting its own modules is not a circle of layers: drop
    # edges from a module to the package that contains it.
    g = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in g.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_only_import_downwards():
    g = graph()
    bad = []
    for m, deps in g.items():
        for d in deps:
            if m.startswith("tuili.model") and d.startswith(("tuili.engine", "tuili.serve", "tuili.cluster")):
                bad.append((m, d))
            if m.startswith("tuili.engine") and d.startswith(("tuili.serve", "tuili.cluster", "tuili.cli")):
                bad.append((m, d))
            if m == "tuili.config" and d.startswith("tuili.model"):
                bad.append((m, d))
            if m.startswith("tuili.serve") and d.startswith("tuili.engine.") :
                bad.append((m, d))  # serve uses only the package's public names
            if m.startswith("tuili.serve") and d == "tuili.cli":
                bad.append((m, d))
    assert not bad, bad


def test_no_python_file_in_the_package_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_a_cpp_file_over_600_lines_says_why_it_stays_whole():
    for p in PKG.rglob("*.cpp"):
        lines = p.read_text().splitlines()
        if len(lines) > 600:
            head = "\n".join(lines[:40]).lower()
            assert "stays whole" in head or "one file" in head, f"{p.name}: {len(lines)} lines and no reason given"


def test_import_tuili_the_request_models_the_cli_and_the_planner_do_not_import_torch():
    code = ("import sys, tuili, tuili.sampling, tuili.serve.protocol, tuili.config, tuili.cli, tuili.plan.cli; "
            "tuili.cli.build_parser(); "
            "from tuili import SamplingParams; SamplingParams(max_tokens=3); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
