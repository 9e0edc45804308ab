"""The folders are the architecture: every import of the package (lazy ones too) points down the
layers (tab → app → engine → models/data → common; host.py beside common), there is no import
circle, no file over ~700 lines and no function of the engine over ~80."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dreambooth"
# what each layer may import (besides itself); "host" is host.py
ALLOWED = {"common": set(), "host": {"common"}, "models": {"common"},
           "data": {"common", "models", "host"}, "engine": {"common", "models", "data"},
           "app": {"common", "models", "data", "engine", "host"},
           "tab": {"common", "models", "data", "engine", "app", "host"}}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules ``path`` imports, at any level of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        assert not (isinstance(node, ast.ImportFrom) and node.level), \
            f"{path}: a relative import (the package imports itself absolutely)"
    return {name for name in found if name in known}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_every_import_points_down_the_layers():
    known = modules()
    wrong = []
    for name, path in known.items():
        mine = layer(name)
        for target in imports(path, known):
            theirs = layer(target)
            if mine and theirs and theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    # a package imports its own submodules by design; a circle is a module reached from itself
    # through another module
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start and len(trail) > 1 and not start.startswith(trail[1] + "."):
                    circles.append(" -> ".join(trail + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert circles == []


def test_files_and_engine_functions_stay_readable():
    long_files = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > 700}
    assert long_files == {}
    long_functions = []
    for path in (PACKAGE / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{path.name}:{node.name}")
    assert long_functions == []


# Removed from the standard library by Python 3.12 and 3.13 (PEP 594 and PEP 632): Forge Neo runs
# Python 3.13, which these machines cannot install, so the code is kept clean of them by reading.
REMOVED_BY_313 = {"aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk", "crypt",
                  "distutils", "imghdr", "imp", "mailcap", "msilib", "nis", "nntplib",
                  "ossaudiodev", "pipes", "smtpd", "sndhdr", "spwd", "sunau", "telnetlib", "uu",
                  "xdrlib", "lib2to3"}


def test_nothing_imports_what_python_313_removed():
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "scripts").glob("*.py"),
             PACKAGE.parent / "install.py", PACKAGE.parent / "preload.py"]
    found = []
    for path in (p for p in files if p.is_file()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in REMOVED_BY_313]
    assert not found, found
