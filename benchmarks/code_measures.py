"""Size and coupling measures of the library code, read with ``ast`` only.

Prints, for every ``.py`` file under ``--root`` (default: ``optax_wa/``):

* the longest functions in code lines (top 10), with their cyclomatic
  complexity;
* the parameter count of every public factory (the public functions a module
  lists in ``__all__``, or its top-level functions without a leading ``_``
  when it has none), largest first;
* module line counts and the share of comment lines per module;
* private-name uses across modules: module A importing ``B._name`` or
  reading ``B._name``, and a private module (``pkg/_mod.py``) imported from
  outside its package.

Definitions. *Code lines* of a function: the lines from its ``def`` to its
last line that hold code, i.e. not blank, not a comment line and not part of
its docstring; nested functions count towards the function that holds them
(and are listed on their own too). *Cyclomatic complexity*: 1 plus one per
``if``/``elif``, loop, ``except``, conditional expression, comprehension
``if``, ``match`` case and extra operand of ``and``/``or`` (McCabe's count on
the syntax tree). *Comment lines*: lines whose first non-blank character is
``#``, outside docstrings and other strings; the share is over all lines.

Run from the repository root::

    python benchmarks/code_measures.py            # optax_wa/
    python benchmarks/code_measures.py --root /tmp/before/optax_wa

``--smoke`` is the same run (it takes well under a second).
"""

from __future__ import annotations

import argparse
import ast
import os
from typing import NamedTuple

_BRANCHES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.IfExp, ast.ExceptHandler)


class Function(NamedTuple):
    module: str
    name: str
    lineno: int
    code_lines: int
    complexity: int


def module_name(root: str, path: str) -> str:
    """``optax_wa/permutation/spec.py`` -> ``optax_wa.permutation.spec``."""
    package = os.path.basename(os.path.normpath(root))
    rel = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join([package, *rel])


def python_files(root: str) -> list[str]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def string_lines(tree: ast.AST) -> set[int]:
    """Lines inside string constants that span several lines (docstrings included)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.update(range(node.lineno, node.end_lineno + 1))
    return out


def docstring_lines(node) -> set[int]:
    body = getattr(node, "body", [])
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        return set(range(body[0].lineno, body[0].end_lineno + 1))
    return set()


def complexity(node) -> int:
    count = 1
    for child in ast.walk(node):
        if isinstance(child, _BRANCHES):
            count += 1
        elif isinstance(child, ast.BoolOp):
            count += len(child.values) - 1
        elif isinstance(child, ast.comprehension):
            count += len(child.ifs)
        elif isinstance(child, ast.match_case):
            count += 1
    return count


def functions(module: str, tree: ast.AST, lines: list[str]) -> list[Function]:
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                skip = docstring_lines(child)
                code = sum(
                    1
                    for n in range(child.lineno, child.end_lineno + 1)
                    if n not in skip
                    and lines[n - 1].strip()
                    and not lines[n - 1].strip().startswith("#")
                )
                out.append(
                    Function(module, name, child.lineno, code, complexity(child))
                )
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def public_names(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return None


def factories(module: str, tree: ast.Module) -> list[tuple[str, int]]:
    if any(is_private(part) for part in module.split(".")):
        return []
    names = public_names(tree)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        public = node.name in names if names is not None else node.name[0] != "_"
        if public:
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            count += (a.vararg is not None) + (a.kwarg is not None)
            out.append((f"{module}.{node.name}", count))
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(module, is_package, tree, package, modules) -> list[str]:
    """Uses of another module's private names, and of private modules from outside."""
    out = []
    aliases: dict[str, str] = {}  # local name -> library module it stands for

    def check_module(target):
        parts = target.split(".")
        for k, part in enumerate(parts):
            owner = ".".join(parts[:k])
            if is_private(part) and not (module + ".").startswith(owner + "."):
                out.append(f"{module} imports private module {target}")
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(module, is_package, node)
            if source.split(".")[0] != package:
                continue
            check_module(source)
            for a in node.names:
                full = f"{source}.{a.name}"
                if full in modules:  # a submodule
                    aliases[a.asname or a.name] = full
                    check_module(full)
                elif is_private(a.name) and source != module:
                    out.append(f"{module} imports {source}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == package:
                    check_module(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != module
        ):
            out.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    return out


def measure(root: str):
    package = os.path.basename(os.path.normpath(root))
    paths = python_files(root)
    names = {module_name(root, p): p for p in paths}
    funcs, facts, mods, private = [], [], [], []
    for name, path in names.items():
        with open(path) as f:
            text = f.read()
        lines = text.splitlines()
        tree = ast.parse(text)
        strings = string_lines(tree)
        comments = sum(
            1
            for n, line in enumerate(lines, 1)
            if line.strip().startswith("#") and n not in strings
        )
        mods.append(
            (os.path.relpath(path, os.path.dirname(root)), len(lines), comments)
        )
        funcs += functions(name, tree, lines)
        facts += factories(name, tree)
        is_package = path.endswith("__init__.py")
        private += private_uses(name, is_package, tree, package, names)
    return funcs, facts, mods, private


def report(root: str) -> None:
    funcs, facts, mods, private = measure(root)
    funcs.sort(key=lambda f: (-f.code_lines, f.module, f.name))
    longest = funcs[0]
    shown = (
        os.path.relpath(root) if not os.path.relpath(root).startswith("..") else root
    )
    print(f"code measures of {shown}")
    print(
        f"\nlongest function: {longest.module}.{longest.name} "
        f"({longest.code_lines} code lines, complexity {longest.complexity})"
    )
    print("\ntop 10 functions by code lines (docstring, comments and blanks excluded)")
    print(f"  {'code lines':>10}  {'complexity':>10}  function")
    for f in funcs[:10]:
        print(f"  {f.code_lines:>10}  {f.complexity:>10}  {f.module}.{f.name}")
    print("\nparameters of public factories (largest first)")
    for name, count in sorted(facts, key=lambda x: (-x[1], x[0])):
        print(f"  {count:>3}  {name}")
    total_lines = sum(m[1] for m in mods)
    total_comments = sum(m[2] for m in mods)
    print("\nmodules: lines, comment lines, comment share")
    for path, n, c in sorted(mods, key=lambda m: -m[1]):
        print(f"  {n:>6}  {c:>5}  {100 * c / max(n, 1):5.1f} %  {path}")
    print(
        f"  {total_lines:>6}  {total_comments:>5}  "
        f"{100 * total_comments / max(total_lines, 1):5.1f} %  (all)"
    )
    distinct = sorted(set(private))
    print(
        f"\nprivate names used across modules: {len(distinct)} names, "
        f"{len(private)} uses"
    )
    for line in distinct:
        print(f"  {private.count(line):>3}x  {line}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument(
        "--root", default=os.path.join(os.path.dirname(here), "optax_wa")
    )
    parser.add_argument("--smoke", action="store_true", help="the same (fast) run")
    args = parser.parse_args(argv)
    report(os.path.normpath(args.root))


if __name__ == "__main__":
    main()
