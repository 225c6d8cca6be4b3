"""Which source files a stage's results depend on: the import closure of its recipe within this project.

DVC's stage dependencies (dvc.yaml, checked against this by a test) and a training checkpoint's identity are
both this list, so editing evaluation code leaves the teacher cache and training up to date, and editing
training code reruns training but not the teacher.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def _file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imports(path: Path, package: str) -> set[str]:
    """Every project module `path` imports, at module level or inside functions (`from a import b` may name
    a module b or a name in a: both are tried)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def stage_sources(module: str) -> list[str]:
    """Source files (relative to the project root, sorted) that `module` imports, transitively, itself included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += _imports(path, name if path.name == "__init__.py" else ".".join(parts[:-1]))
    return sorted(str(p.relative_to(ROOT)) for p in seen)


def _code(path: Path) -> str:
    """The module's syntax tree without docstrings: comments, docstrings and formatting do not count."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def sources_hash(module: str) -> str:
    """A hash of the code (not comments or docstrings) of `stage_sources(module)`."""
    digest = hashlib.sha256()
    for name in stage_sources(module):
        digest.update(name.encode() + b"\0" + _code(ROOT / name).encode())
    return digest.hexdigest()[:16]


STAGES = {
    "extract": "stages.extract",
    "train": "stages.train",
    "evaluate": "stages.evaluate",
    "summarize": "stages.summarize",
}


def update_dvc_yaml(path: Path) -> None:
    """Rewrite the `.py` dependencies of each stage in a dvc.yaml to `stage_sources` (comments kept)."""
    lines, out, stage, i = path.read_text().splitlines(), [], None, 0
    is_source = re.compile(r"^( +)- (pipeline|stages)/.*\.py$").match
    while i < len(lines):
        if match := re.match(r"^  (\w+):( *#.*)?$", lines[i]):
            stage = match.group(1)
        if (source := is_source(lines[i])) and stage in STAGES:
            indent = source.group(1)
            while i < len(lines) and is_source(lines[i]):
                i += 1
            out += [f"{indent}- {name}" for name in stage_sources(STAGES[stage])]
            continue
        out.append(lines[i])
        i += 1
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":  # python -m pipeline.sources dvc.yaml: after changing a stage's imports
    import sys

    update_dvc_yaml(Path(sys.argv[1]))
