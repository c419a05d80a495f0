"""The import layering of docs/design.md: no import cycles between the project's modules,
counting imports inside functions too (an import moved into a function to dodge a cycle is
still a cycle), and each package imports only the packages below it."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dhara_jax", "data_pipeline", "eval")


def module_name(path: Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
  return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")
          if "remote_code" not in p.parts}  # PyTorch files copied beside exports


def imports(path: Path, known: set[str]) -> set[str]:
  """The project modules importing `path` runs, from imports anywhere in it (top level or
  inside functions): each module it names, and the packages above that module which are not
  also above `path` (importing a.b.c runs a/b/__init__.py first)."""
  this = module_name(path)
  package = this if path.name == "__init__.py" else this.rpartition(".")[0]
  named = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      named.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for alias in node.names:  # a submodule if it is one, else an attribute of `base`
        named.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
  found = set()
  ours = {package.rsplit(".", i)[0] for i in range(package.count(".") + 1)}
  for name in named:
    while name and name not in known:  # a.b.c → the deepest project module it names
      name = name.rpartition(".")[0]
    while name and name not in ours:
      if name in known:
        found.add(name)
      name = name.rpartition(".")[0]
  found.discard(this)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = project_modules()
  known = set(modules)
  return {name: imports(path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v: str) -> None:
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  assert cycles(import_graph()) == []


if __name__ == "__main__":
  for cycle in cycles(import_graph()):
    print(cycle)
