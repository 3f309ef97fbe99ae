"""The direction of imports (DESIGN.md section 4): edges -> jobs -> model families -> foundations.

A model family loads (also a fine-tuned delta) with only its own folder and what lies below it, so
the trainer, the evaluation, batch jobs and the server never come along with `medfm.load()`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medfm"

#: each layer may import its own layer and the ones below it, never one above
LAYERS = [
    {"cli", "__main__", "serve"},
    {"batch", "train", "evaluate", "qa"},
    {"segment", "clip", "vlm"},
    {"lm", "data", "prompts", "preprocess", "intensity", "io", "hub", "catalog", "errors", "progress"},
]
#: the foundations' order among themselves: a module may import only those listed after it
FOUNDATION_ORDER = ["lm", "data", "prompts", "preprocess", "intensity", "io", "catalog", "progress", "hub", "errors"]


def _part(module: str) -> str | None:
    """``medfm.segment.model`` -> ``segment``; ``medfm`` itself (the public API) -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "medfm" and len(parts) > 1 else None


def _layer(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def _imports(path: Path) -> set[str]:
    """Every medfm module a file imports, at the top or inside functions (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "medfm" or name.startswith("medfm.")}


def test_every_package_has_a_layer() -> None:
    parts = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()}
    assert parts <= set().union(*LAYERS), f"give {sorted(parts - set().union(*LAYERS))} a layer in this test and DESIGN.md"


def test_imports_flow_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part("medfm." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if own in (None, "__init__"):
            continue  # medfm/__init__.py is the public API: it may reach every family (lazily)
        for imported in _imports(path):
            other = _part(imported)
            if other is None or other == own:
                continue
            above = _layer(other) < _layer(own)
            if not above and own in FOUNDATION_ORDER and other in FOUNDATION_ORDER:
                above = FOUNDATION_ORDER.index(other) < FOUNDATION_ORDER.index(own)
            if above:
                upward.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not upward, "imports against the direction of DESIGN.md:\n" + "\n".join(upward)


def test_loading_the_default_model_imports_no_job_or_edge() -> None:
    code = ("import sys, medfm; medfm.load(); "
            "print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in "
            "{'train', 'evaluate', 'batch', 'serve', 'qa', 'cli'} and m.startswith('medfm.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
