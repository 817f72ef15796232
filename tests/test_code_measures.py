"""Tests of benchmarks/code_measures.py on a small package with known measures."""

from __future__ import annotations

import importlib.util
import os

_PATH = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "benchmarks", "code_measures.py"
)
_spec = importlib.util.spec_from_file_location("code_measures", _PATH)
cm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cm)

_CORE = '''\
"""Module docstring."""

import pkg._hidden


def _helper(x):
    return x


def build(a, b, *rest, c=1, **kw):
    """Docstring line one.

    More docstring.
    """
    # a comment line
    if a and b or c:
        for i in rest:
            if i:
                pass

    def inner():
        return [j for j in rest if j]

    return a if b else c


class Box:
    def method(self):
        return 1


__all__ = ["build"]
'''

_USER = """\
from pkg import core
from pkg.core import _helper
from . import core as c2


def use():
    return core._helper(1) + c2._helper(2) + _helper(3) + core.build(1, 2)
"""


def _package(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "core.py").write_text(_CORE)
    (root / "user.py").write_text(_USER)
    (root / "_hidden.py").write_text("X = 1\n")
    # A private module is private to its package (subpackages included).
    (root / "sub" / "__init__.py").write_text("from pkg import _hidden\n")
    (root / "sub" / "_deep.py").write_text("Y = 2\n")
    (root / "user2.py").write_text("from pkg.sub._deep import Y\n")
    return str(root)


def test_function_lines_complexity_and_factories(tmp_path):
    funcs, facts, mods, _ = cm.measure(_package(tmp_path))
    by_name = {(f.module, f.name): f for f in funcs}
    build = by_name[("pkg.core", "build")]
    # def, if, for, if, pass, def inner, return [...], return a if b else c
    assert build.code_lines == 8
    # 1 + if + (and/or: 2 extra operands) + for + if + comprehension if + IfExp
    assert build.complexity == 1 + 1 + 2 + 1 + 1 + 1 + 1
    assert by_name[("pkg.core", "build.inner")].code_lines == 2
    assert by_name[("pkg.core", "Box.method")].code_lines == 2
    # __all__ decides what is public: _helper and Box are not factories.
    assert ("pkg.core.build", 5) in facts
    assert not any("helper" in name for name, _ in facts)
    assert ("pkg.user.use", 0) in facts  # no __all__: names without "_"
    lines = {path: (n, c) for path, n, c in mods}
    assert lines[os.path.join("pkg", "core.py")] == (len(_CORE.splitlines()), 1)


def test_private_uses_across_modules(tmp_path):
    *_, private = cm.measure(_package(tmp_path))
    assert sorted(private) == sorted(
        [
            "pkg.user2 imports private module pkg.sub._deep",
            "pkg.user imports pkg.core._helper",
            "pkg.user uses pkg.core._helper",
            "pkg.user uses pkg.core._helper",
        ]
    )


def test_library_has_no_private_use_in_permutation_or_transfer(capsys):
    cm.main(["--smoke"])
    out = capsys.readouterr().out
    section = out.split("private names used across modules")[1]
    assert "optax_wa.transfer" not in section
    assert "optax_wa.permutation" not in section
    assert "longest function:" in out and "parameters of public factories" in out
