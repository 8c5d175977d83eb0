"""The house: imports run one way, down the layers below, with no circle; fid.py stands alone; the routes
table of the docs is model.ROUTES. Read from the source files with `ast`, imports inside functions
included."""
import ast
import os
import re

from conftest import ROOT

# lowest first; a file imports only files of the layers before its own
LAYERS = [
    ["conditioning"], ["model", "unet", "diffusion", "latents", "data"],
    ["checkpoint"], ["text"], ["shapes"], ["config"], ["sample", "encode"],
    ["train"],
    ["experiments"],  # the harness: every file of the experiments/ package
]
APART = ["fid"]  # imports nothing of the project, so that it can be copied next to any model's samples
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
PROJECT = set(LAYER) | set(APART)


def sources():
    """{module name: path} of every project source file; the experiments/ package counts as one module."""
    files = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    package = os.path.join(ROOT, "experiments")
    for f in sorted(os.listdir(package)):
        if f.endswith(".py"):
            files[f"experiments/{f[:-3]}"] = os.path.join(package, f)
    return files


def imports(path):
    """The project modules a file imports, anywhere in it (the experiments package's own files as
    `experiments`)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["experiments"] if node.level else [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n and n.split(".")[0] in PROJECT}
    return found


def module_of(name):
    return "experiments" if name.startswith("experiments/") else name


def graph():
    return {name: imports(path) - {module_of(name)} for name, path in sources().items()}


def test_every_source_file_has_a_layer():
    assert {module_of(n) for n in sources()} == PROJECT


def test_imports_run_down_the_layers_and_fid_imports_nothing_of_the_project():
    up = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
          if module_of(a) in APART or b in APART or LAYER[b] >= LAYER[module_of(a)]]
    assert up == []


def test_no_import_cycle():
    edges = {}
    for a, deps in graph().items():
        edges.setdefault(module_of(a), set()).update(deps)

    def reaches(start, goal, seen):
        nexts = edges.get(start, ())
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in nexts)
    assert [m for m in edges if reaches(m, m, {m})] == []


def test_the_layer_check_fails_on_a_planted_back_import(tmp_path):
    """The check is real: data.py importing the dataset built on it (shapes) is an import back up."""
    planted = tmp_path / "data.py"
    planted.write_text(open(os.path.join(ROOT, "data.py")).read() + "\nfrom shapes import ShapesDataset\n")
    assert "shapes" in imports(str(planted)) and LAYER["shapes"] >= LAYER["data"]


def test_the_docs_routes_table_is_model_routes():
    """docs/baselines.md has one row per route of model.ROUTES, with its context, QK-norm, modulation and
    adaLN terms as the table holds them: a route added to the table and not to the docs (or the other way)
    fails."""
    from model import ROUTES
    with open(os.path.join(ROOT, "docs", "baselines.md")) as f:
        rows = re.findall(r"^\| `([\w-]+)` \| (.*) \|$", f.read(), re.M)
    cells = {name: [c.strip() for c in row.split("|")] for name, row in rows}
    routes = {name: row for name, row in cells.items() if len(row) == 5}  # the routes table's rows
    assert set(routes) == set(ROUTES)
    for name, (source, context, qk_norm, modulation, adaln) in routes.items():
        r = ROUTES[name]
        assert (context, qk_norm, modulation) == (str(r.context), "on" if r.qk_norm else "off",
                                                  r.modulation), name
        assert adaln == "e_t + " + " + ".join(r.adaln), name


def test_ci_runs_exactly_the_readmes_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = [line for line in f.read().splitlines() if line.endswith("python -m pytest -q tests")]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().splitlines()
    assert len(commands) == 1 and commands[0] in ci
