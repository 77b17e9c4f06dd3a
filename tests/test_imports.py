"""Imports between the repository's modules run one way (no cycle), and each name is imported from the module that
defines it, not through one that only imports it. Read with `ast`: nothing is imported to check it."""
import ast
from pathlib import Path

from conftest import ROOT

MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}  # the flat top-level modules
TESTS = {p.stem: p for p in sorted((ROOT / "tests").glob("*.py"))}


def type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under `if TYPE_CHECKING:`: they never run (annotations only)."""
    return {node for top in ast.walk(tree) if isinstance(top, ast.If) and ast.unparse(top.test).endswith("TYPE_CHECKING")
            for stmt in top.body for node in ast.walk(stmt) if isinstance(node, (ast.Import, ast.ImportFrom))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the file imports anywhere (at the top, or inside functions), at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and node not in skip:
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node not in skip and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & known


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (module -> the modules it imports) as [a, b, ..., a], or None."""
    state, stack = {}, []  # state: 1 while on the stack, 2 once every path from it is done

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_between_modules_have_no_cycle():
    graph = {m: imported_modules(p, set(MODULES)) - {m} for m, p in MODULES.items()}
    assert graph["model"] and graph["checkpoints"]  # the graph is read: model imports encoders, checkpoints model
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def defined_names(tree: ast.Module) -> set[str]:
    """The names a module defines at its top level (def, class, assignment; inside top-level if / try / with too),
    not those it imports."""
    names, body = set(), list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def test_every_name_is_imported_from_the_module_that_defines_it():
    known = {**MODULES, **TESTS}
    defined = {m: defined_names(ast.parse(p.read_text(encoding="utf-8"))) for m, p in known.items()}
    wrong = []
    for m, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
                wrong += [f"{path.name}:{node.lineno}: {a.name} from {node.module}" for a in node.names
                          if a.name != "*" and a.name not in defined[node.module]]
    assert not wrong, "imported from a module that does not define it:\n" + "\n".join(wrong)
