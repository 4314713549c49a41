"""bridges/ is layered: every import points down (README, Architecture). A module may import its own layer
and the layers below it, never one above, and bridges/ never imports the training side."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# bottom to top
LAYERS = [
    ("bridges.dtypes", "bridges.architecture", "bridges.rank_status"),
    ("bridges.checkpoint",),
    ("bridges.rules",),
    ("bridges.megatron",),
    ("bridges.models",),
    ("bridges.load", "bridges.export", "bridges.imported"),
    ("bridges.verify", "bridges.errors", "bridges.plan"),
]
TRAINING_SIDE = ("callbacks", "recipes", "train", "lightning", "hydra", "omegaconf")


def layer_of(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def bridges_modules():
    for path in sorted((ROOT / "bridges").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imported(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            # `from bridges.x import y` may import the submodule y
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_every_bridges_module_has_a_layer():
    unplaced = [name for name, _ in bridges_modules() if name != "bridges" and layer_of(name) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS and the README): {unplaced}"


@pytest.mark.parametrize("name,path", list(bridges_modules()), ids=lambda x: str(x))
def test_imports_point_down(name, path):
    own = layer_of(name)
    up, training = [], []
    for target in imported(path):
        if target.split(".")[0] in TRAINING_SIDE:
            training.append(target)
        level = layer_of(target)
        if own is not None and level is not None and level > own:
            up.append(target)
    assert not training, f"{name} imports the training side: {training}"
    assert not up, f"{name} (layer {own}) imports upward: {up}"
