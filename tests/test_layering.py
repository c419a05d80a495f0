"""The import layering of docs/design.md (## Layering): each module imports only modules of its
own layer or the layers below, peers kept apart stay apart, and there are no import cycles.
Imports count wherever they stand (top level, inside functions, under TYPE_CHECKING): an import
moved into a function to dodge a cycle or a rule is still an import."""

import ast
import re
from pathlib import Path

import data_pipeline

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dhara_jax", "data_pipeline", "eval")
# Names a package hands out lazily (its module __getattr__): importing one imports its module.
LAZY_EXPORTS = {"data_pipeline": data_pipeline._EXPORTS}

# Lowest first. A module belongs to the layer of the longest prefix naming it or a package above
# it; the top packages' __init__ files import nothing of the project, so they are base.
LAYERS = (
    ("base", ("dhara_jax.errors", "dhara_jax.sections", "dhara_jax.files",
              "dhara_jax.arg_types", "dhara_jax.sampler_options")),
    ("config", ("data_pipeline.config", "dhara_jax.config", "dhara_jax.sharding")),
    ("data", ("data_pipeline",)),
    ("core", ("dhara_jax",)),
    ("sampling", ("dhara_jax.sampling",)),
    ("runs", ("dhara_jax.loop", "dhara_jax.convert", "dhara_jax.runs")),
    ("tools", ("eval", "dhara_jax.generate", "dhara_jax.benchmarks", "dhara_jax.study")),
    ("quickstart", ("dhara_jax.quickstart",)),
    ("cli", ("dhara_jax.cli",)),
)
# Peers of one layer that never import one another: (importer, what it must not import).
APART = (
    ("eval", ("dhara_jax.study", "dhara_jax.generate", "dhara_jax.benchmarks")),
    ("dhara_jax.study", ("eval",)),  # it runs `dhara eval` as a process
    ("dhara_jax.generate", ("eval", "dhara_jax.study", "dhara_jax.benchmarks")),
    ("dhara_jax.benchmarks", ("eval", "dhara_jax.study")),
)
# Imports that break a rule and are being moved elsewhere: (importer, imported) → where to.
# The last test fails once one is gone, so that its line goes too.
PENDING: dict[tuple[str, str], str] = {}


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
        if f"{base}.{alias.name}" in known:
          named.add(f"{base}.{alias.name}")
        else:
          named.add(LAZY_EXPORTS.get(base, {}).get(alias.name, base))
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


def under(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def layer(module: str) -> int:
  """The index in LAYERS of the longest prefix naming `module` or a package above it."""
  if module in PACKAGES:
    return 0
  found = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
           if under(module, prefix)]
  assert found, f"{module} is in no layer"
  return max(found)[1]


def edges() -> list[tuple[str, str]]:
  return [(module, imported) for module, imported_set in sorted(import_graph().items())
          for imported in sorted(imported_set)]


def test_no_import_cycles():
  assert cycles(import_graph()) == []


def test_each_module_imports_only_its_layer_and_below():
  upward = [f"{module} ({LAYERS[layer(module)][0]}) imports {imported} "
            f"({LAYERS[layer(imported)][0]})" for module, imported in edges()
            if layer(imported) > layer(module) and (module, imported) not in PENDING]
  assert upward == []


def test_peers_kept_apart_stay_apart():
  crossing = [f"{module} imports {imported}" for module, imported in edges()
              for importer, others in APART if under(module, importer)
              for other in others if under(imported, other)]
  assert crossing == []


def test_pending_moves_are_still_pending():
  """A PENDING import that is gone has its line removed (the rules then hold it)."""
  assert [pair for pair in PENDING if pair not in edges()] == []


def test_the_design_states_these_layers():
  """docs/design.md's Layering section names every layer and every prefix the rules use."""
  text = (REPO / "docs" / "design.md").read_text()
  section = re.search(r"^## Layering\n(.*?)^## ", text, re.S | re.M)
  assert section, "docs/design.md has no ## Layering section"
  named = set(re.findall(r"`([\w.]+)`", section.group(1)))
  wanted = {name for name, _ in LAYERS} | {p for _, prefixes in LAYERS for p in prefixes}
  wanted |= {importer for importer, _ in APART}
  assert sorted(wanted - named) == []


if __name__ == "__main__":
  for cycle in cycles(import_graph()):
    print(cycle)
