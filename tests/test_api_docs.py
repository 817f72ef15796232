"""The API reference (docs/api.md) lists every public name, and nothing else.

A module's public names are its ``__all__`` where it defines one, otherwise
the names without a leading underscore that the module itself defines
(functions and classes whose ``__module__`` is the module). A name counts as
documented when some ``auto*`` directive of docs/api.md resolves to the same
object, so ``optax_wa.lookaround`` documents ``optax_wa.averaging.lookaround``.
"""

import importlib
import inspect
import pathlib
import pkgutil
import re
import types

import pytest

import optax_wa

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
DIRECTIVE = re.compile(
    r"^\.\. auto(function|class|module|data|attribute|exception|method)::\s+(\S+)",
    re.MULTILINE,
)

MODULES = ["optax_wa"] + sorted(
    name
    for _, name, _ in pkgutil.walk_packages(optax_wa.__path__, prefix="optax_wa.")
    if not any(part.startswith("_") for part in name.split("."))
)


def _resolve(target: str):
    """The object a dotted autodoc target names (module prefix, then attributes)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def _targets() -> list[str]:
    return [target for _, target in DIRECTIVE.findall(API.read_text())]


def public_names(module: types.ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    )


def test_every_directive_names_an_existing_object():
    targets = _targets()
    assert len(targets) > 50, "docs/api.md lost its directives"
    unresolved = []
    for target in targets:
        try:
            _resolve(target)
        except (ImportError, AttributeError):
            unresolved.append(target)
    assert not unresolved, f"docs/api.md names objects that do not exist: {unresolved}"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_is_in_the_api_reference(name):
    module = importlib.import_module(name)
    documented = {id(_resolve(target)) for target in _targets()}
    missing = []
    for public in public_names(module):
        value = getattr(module, public)  # a stale __all__ entry fails here
        if isinstance(value, types.ModuleType):
            # A submodule is documented through its own names (its own case).
            continue
        if id(value) not in documented:
            missing.append(f"{name}.{public}")
    assert not missing, f"missing from docs/api.md: {missing}"


def test_public_names_rule_sees_a_missing_name(tmp_path, monkeypatch):
    """The rule above catches an undocumented function (the test can fail)."""
    (tmp_path / "fake_public_mod.py").write_text(
        "def documented():\n    pass\n\ndef forgotten():\n    pass\n\n"
        "def _private():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fake_public_mod")
    assert public_names(module) == ["documented", "forgotten"]
    module.__all__ = ["documented"]
    assert public_names(module) == ["documented"]


def test_version_has_one_source():
    """pyproject reads the version from optax_wa.__version__; CITATION agrees."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "optax_wa.__version__"
    citation = (ROOT / "CITATION.cff").read_text()
    match = re.search(r"^version:\s*(\S+)\s*$", citation, re.MULTILINE)
    assert match and match.group(1) == optax_wa.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", optax_wa.__version__)
