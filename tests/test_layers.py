"""The package's imports run one way: each module imports only from its own layer or the layers below it
(data flows source -> shards -> loader -> model -> engine -> tracking/checkpoints -> export, and the files
of a run are owned by the bottom layer). Every import is read from the source, those inside functions too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # bottom first
    ("para_train.config", "para_train.files", "para_train.scenes", "para_train.kernels"),
    ("para_train.models", "para_train.kernel_dispatch", "para_train.sampling", "para_train.tracking"),
    ("para_train.data",),
    ("para_train.training",),
    ("para_train.inference",),
    ("para_train.main", "para_train.cli", "para_train.plan", "para_train.__main__"),
]


def layer_of(module: str) -> int | None:
    if module == "para_train":  # the package's __init__: its version only
        return 0
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from para_train.x import y` may name a module y
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if layer_of(node.module) is None]
    return found


def package_modules():
    """(module name, file) of every module of the installed package (kernels/ is installed as para_train.kernels)."""
    for folder, package in ((ROOT / "para_train", "para_train"), (ROOT / "kernels", "para_train.kernels")):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            yield ".".join((package, *(rel.parts[:-1] if rel.name == "__init__" else rel.parts))), path


def test_every_package_module_has_a_layer():
    assert [m for m, _ in package_modules() if layer_of(m) is None] == []


def test_no_import_runs_back_up():
    upward = []
    for module, path in package_modules():
        own = layer_of(module)
        for line, target in imports(path):
            theirs = layer_of(target) if target.startswith("para_train") else None
            if theirs is not None and theirs > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} (layer {own}) imports {target} (layer {theirs})")
    assert upward == [], "imports that run back up:\n" + "\n".join(upward)


def test_benchmarks_use_the_package_not_the_tests():
    """Benchmarks call the package's entry points; of tests/ they may use only the real-service harnesses
    (tests/*_server.py, tests/slurm_cluster.py), never fixtures or test modules."""
    offenders = [f"{p.relative_to(ROOT)}:{line} {t}" for p in sorted((ROOT / "benchmarks").glob("*.py"))
                 for line, t in imports(p) if t.split(".")[0] in {"conftest", "tests", "golden"} or t.startswith("test_")]
    assert offenders == []
