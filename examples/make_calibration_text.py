"""Write elastic's built-in calibration text: docstrings of the Python standard library.

The docstrings are real English technical prose under the PSF License. They are read from the
source files with ``ast``, so no module is imported or run. Modules are taken in sorted name
order, and within a module the docstrings keep their source order (module, then public classes,
functions and methods); each module contributes at most ``--per-module`` characters and becomes
one document, and documents are separated by blank lines. The same Python version always writes
the same bytes; another version may word its docstrings differently.

Usage:
    python examples/make_calibration_text.py elastic_cli/data/calibration.txt
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
from pathlib import Path

TARGET_BYTES = 150_000
PER_MODULE_CHARS = 1_500


def module_source(name: str) -> Path | None:
    """Return the source file of a top-level standard-library module, or ``None`` for C modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
        if path.is_file():
            return path
    return None


def docstrings(tree: ast.Module) -> list[str]:
    """Collect the module docstring and those of public classes, functions and methods, in source order."""
    found = []
    module_doc = ast.get_docstring(tree, clean=True)
    if module_doc:
        found.append(module_doc)

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
            if isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def module_document(path: Path, limit: int) -> str:
    """Join a module's docstrings into one document of at most ``limit`` characters, without blank lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts: list[str] = []
    size = 0
    for doc in docstrings(tree):
        text = "\n".join(line.rstrip() for line in doc.splitlines() if line.strip())
        if parts and size + len(text) + 1 > limit:
            break
        parts.append(text[:limit])
        size += len(text) + 1
    return "\n".join(parts).strip()


def build_text(target_bytes: int = TARGET_BYTES, per_module: int = PER_MODULE_CHARS) -> str:
    """Return the calibration text: an attribution line, then one document per module until ``target_bytes``."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    header = (
        f"# Docstrings of the Python {version} standard library, Copyright Python Software Foundation, "
        "under the PSF License Version 2; written by examples/make_calibration_text.py."
    )
    documents = [header]
    size = len(header.encode())
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("antigravity", "this"):
            continue
        path = module_source(name)
        if path is None:
            continue
        document = module_document(path, per_module)
        if not document:
            continue
        documents.append(document)
        size += len(document.encode()) + 2
        if size >= target_bytes:
            break
    return "\n\n".join(documents) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="File to write, such as elastic_cli/data/calibration.txt.")
    parser.add_argument("--bytes", type=int, default=TARGET_BYTES, help="Stop after this many bytes (whole modules).")
    parser.add_argument("--per-module", type=int, default=PER_MODULE_CHARS, help="Characters per module at most.")
    args = parser.parse_args()
    text = build_text(args.bytes, args.per_module)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(text.encode())} bytes, {text.count(chr(10) + chr(10))} documents)")


if __name__ == "__main__":
    main()
