"""cim_jax's imports follow the layer diagram at the top of docs/ARCHITECTURE.md: no import of a
higher layer, no cycle, no cim_jax import inside a function."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_layers(markdown: str):
  """The first code block's `L<n>  name ...  # comment` lines -> ({package: n}, apart pairs).

  Names are relative to cim_jax; a comment `# a and b never import each other` adds the pair.
  """
  block = re.search(r"```[^\n]*\n(.*?)```", markdown, re.S).group(1)
  layers, apart = {}, set()
  for line in block.splitlines():
    match = re.match(r"\s*L(\d+)\s+([^#]*)(?:#(.*))?$", line)
    if not match:
      continue
    for name in match.group(2).split():
      layers[f"cim_jax.{name}"] = int(match.group(1))
    for a, b in re.findall(r"(\w+) and (\w+) never import each other", match.group(3) or ""):
      apart.add(frozenset((f"cim_jax.{a}", f"cim_jax.{b}")))
  return layers, apart


def package_sources(root: str) -> dict[str, str]:
  """{module name: source} of every .py file of the cim_jax package under `root`."""
  sources = {}
  for folder, _, files in os.walk(os.path.join(root, "cim_jax")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        with open(path, encoding="utf-8") as f:
          sources[module] = f.read()
  return sources


def imports(module: str, source: str, modules) -> list[tuple[str, bool]]:
  """(imported cim_jax module, inside a function?) for every import statement of `source`."""
  is_package = any(m.startswith(module + ".") for m in modules)
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        found.extend((alias.name, inside) for alias in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:  # relative: from the module's own package upwards
          package = module.split(".")[:len(module.split(".")) - child.level + is_package]
          base = ".".join(package + ([base] if base else []))
        for alias in child.names:  # `from p import m` imports module p.m when there is one
          name = f"{base}.{alias.name}"
          found.append((name if name in modules else base, inside))
      visit(child, inside)

  visit(ast.parse(source), False)
  return [(name, inside) for name, inside in found
          if name == "cim_jax" or name.startswith("cim_jax.")]


def layer_of(module: str, layers: dict[str, int]):
  """(package, layer) of the longest diagram entry that is `module` or a package above it."""
  for package in sorted(layers, key=len, reverse=True):
    if module == package or module.startswith(package + "."):
      return package, layers[package]
  return None, None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (or a module importing itself)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        connect(w)
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
      if len(component) > 1 or v in graph.get(v, ()):
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return found


def violations(sources: dict[str, str], layers: dict[str, int], apart: set) -> list[str]:
  """Every break of the layering rules, one line each."""
  problems, graph = [], {}
  for module, source in sorted(sources.items()):
    package, layer = layer_of(module, layers)
    edges = imports(module, source, sources)
    graph[module] = {name for name, _ in edges if name in sources}
    if package is None and module != "cim_jax":
      problems.append(f"{module} is in no layer of the diagram")
    for name, inside in edges:
      if inside:
        problems.append(f"{module} imports {name} inside a function")
      if module == "cim_jax":
        problems.append(f"cim_jax/__init__.py imports {name}")
        continue
      other, other_layer = layer_of(name, layers)
      if package is None or other is None:
        continue
      if other_layer > layer:
        problems.append(f"{module} (L{layer}) imports {name} (L{other_layer})")
      elif frozenset((package, other)) in apart:
        problems.append(f"{module} imports {name}: {package} and {other} never import each other")
  problems.extend("import cycle: " + " <-> ".join(c) for c in cycles(graph))
  return problems


def test_cim_jax_follows_the_diagram_of_architecture_md():
  with open(os.path.join(REPO, "docs", "ARCHITECTURE.md"), encoding="utf-8") as f:
    layers, apart = read_layers(f.read())
  assert layers["cim_jax.errors"] == 0 and layers["cim_jax.tools"] == 5, layers
  assert frozenset(("cim_jax.models", "cim_jax.data")) in apart
  sources = package_sources(REPO)
  assert len(sources) > 20 and "cim_jax.models.vit" in sources
  problems = violations(sources, layers, apart)
  assert not problems, "\n".join(problems)


def test_the_checker_finds_each_kind_of_break():
  layers, apart = read_layers("```\nL2  train  # high\nL1  models  data  # models and data "
                              "never import each other\nL0  errors\n```\n")
  assert layers == {"cim_jax.train": 2, "cim_jax.models": 1, "cim_jax.data": 1,
                    "cim_jax.errors": 0}
  sources = {
      "cim_jax": "",
      "cim_jax.errors": "import os\n",
      "cim_jax.train": "",
      "cim_jax.train.loop": "from cim_jax.models import vit\nfrom . import step\n",
      "cim_jax.train.step": "from cim_jax.train import loop\n",  # a cycle
      "cim_jax.models": "",
      "cim_jax.models.vit": ("from cim_jax import errors\nimport cim_jax.train\n"
                             "def f():\n  from cim_jax.models import cim\n"),
      "cim_jax.models.cim": "from .vit import f\nfrom cim_jax.data import pairs\n",
      "cim_jax.data": "",
      "cim_jax.data.pairs": "",
      "cim_jax.extra": "",
  }
  assert sorted(violations(sources, layers, apart)) == sorted([
      "cim_jax.extra is in no layer of the diagram",
      "cim_jax.models.vit (L1) imports cim_jax.train (L2)",
      "cim_jax.models.vit imports cim_jax.models.cim inside a function",
      "cim_jax.models.cim imports cim_jax.data.pairs: cim_jax.models and cim_jax.data never "
      "import each other",
      "import cycle: cim_jax.models.cim <-> cim_jax.models.vit",
      "import cycle: cim_jax.train.loop <-> cim_jax.train.step",
  ])
