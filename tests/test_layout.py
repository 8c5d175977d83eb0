"""The house: imports run one way, down the layers below, with no circle; fid.py stands alone; the routes
table of the docs is model.ROUTES. Read from the source files with `ast`, imports inside functions
included."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# lowest first; a file imports only files of the layers before its own
LAYERS = [
    ["conditioning", "checks"],  # the paper's mechanism; what a command line's values must be
    ["model", "diffusion", "data"],  # the denoiser and its routes, the flow objective, a training example
    ["mdt", "unet", "ddpm", "latents", "shards"],  # baselines, DDPM, the autoencoder, webdataset shards
    ["checkpoint"], ["text"], ["shapes", "loader"],  # loader: a run's data order, a batch to the model
    ["config"],  # flags, recipes, validation
    ["build"],  # what a configuration builds
    ["run"],  # a run folder's life
    ["sample", "encode"],
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


def docs_route_row(name, route):
    """The row of docs/baselines.md's routes table that model.ROUTES' entry `name` stands for."""
    cells = [f"`{name}`", route.source, route.attention or "none", " + ".join(route.context) or "none",
             "on" if route.qk_norm else "off", route.modulation, " + ".join(("e_t",) + route.adaln)]
    return "| " + " | ".join(cells) + " |"


def test_the_docs_routes_table_is_model_routes():
    """docs/baselines.md has one row per route of model.ROUTES, with its attention, context terms, QK-norm,
    modulation and adaLN terms as the table holds them (a route without adaLN terms reads `e_t`): a route
    added to the table and not to the docs (or the other way) fails, and the message gives the row to add."""
    from model import ROUTES
    with open(os.path.join(ROOT, "docs", "baselines.md")) as f:
        rows = re.findall(r"^\| `([\w-]+)` \| (.*) \|$", f.read(), re.M)
    routes = {name: line for name, line in rows if len(line.split("|")) == 6}  # the routes table's rows
    missing = [docs_route_row(name, route) for name, route in ROUTES.items() if name not in routes]
    assert not missing, "add to docs/baselines.md's routes table:\n" + "\n".join(missing)
    assert set(routes) == set(ROUTES), f"not in model.ROUTES: {sorted(set(routes) - set(ROUTES))}"
    for name, route in ROUTES.items():
        cells = " | ".join(c.strip() for c in routes[name].split("|"))
        want = docs_route_row(name, route)
        assert f"| `{name}` | {cells} |" == want, f"docs/baselines.md's row of {name} should read: {want}"


def test_ci_runs_exactly_the_readmes_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = [line for line in f.read().splitlines() if line.endswith("python -m pytest -q tests")]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().splitlines()
    assert len(commands) == 1 and commands[0] in ci


@pytest.mark.slow
def test_a_fork_adds_a_route_and_a_gate_with_one_line_each(tmp_path):
    """The fork the tables promise: a copy of the code with one line added to model.ROUTES (a route copied
    from `ours`) and one to conditioning.GATES (a gate copied from `linear`) trains with both and samples a
    grid, with nothing else edited -- the CLI choices, validation and the stored configuration follow the
    tables."""
    fork = tmp_path / "fork"
    shutil.copytree(ROOT, fork, ignore=shutil.ignore_patterns(".git", "runs", "docs", "tests", "__pycache__"))
    for name, line, copy in (("model.py", '    "ours": Route(', '    "ours_copy": Route('),
                             ("conditioning.py", '    "linear": Gate(', '    "linear_copy": Gate(')):
        lines = (fork / name).read_text().splitlines(keepends=True)
        i = next(i for i, text in enumerate(lines) if text.startswith(line))
        lines.insert(i + 1, lines[i].replace(line, copy, 1))  # the one added line
        (fork / name).write_text("".join(lines))
    flags = ["--model", "T/4", "--res", "16", "--base-res", "16", "--shapes-size", "64", "--batch", "8",
             "--steps", "2", "--eval-per-class", "0", "--sample-every", "-1", "--cond", "ours_copy",
             "--gate-size", "linear_copy", "--out", str(tmp_path / "runs")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "train.py", *flags], cwd=fork, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next((tmp_path / "runs").iterdir())
    grid = subprocess.run([sys.executable, "sample.py", "--ckpt", str(run), "--classes", "0,1", "--seeds",
                           "0", "--steps", "2", "--out", str(tmp_path / "grid.png")], cwd=fork, env=env,
                          capture_output=True, text=True)
    assert grid.returncode == 0, grid.stderr[-3000:]
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert '"cond": "ours_copy"' in done.stdout and '"gate_size": "linear_copy"' in done.stdout


def test_the_readmes_ablation_table_names_every_route_and_gate():
    """The README's `--cond` and `--gate-*` rows list model.ROUTES and conditioning.GATES: a route or gate
    added to its table and not to the README fails here, naming what to add."""
    from conditioning import GATES
    from model import ROUTES
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = {line.split("|")[1].strip(): line for line in f if line.startswith("| `--")}
    named = lambda row: set(re.findall(r"`([a-z_]+)", "|".join(row.split("|")[2:])))
    missing = set(ROUTES) - named(rows["`--cond`"])
    assert not missing, f"add {sorted(missing)} to the README's --cond row"
    missing = set(GATES) - named(rows["`--gate-size` / `--gate-crop` / `--gate-flip`"])
    assert not missing, f"add {sorted(missing)} to the README's --gate-* row"
