"""The API reference (docs/api.md) lists every public name, and nothing else;
every public function and method annotates every parameter and its return.

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


# --- type annotations ----------------------------------------------------------

# Methods of a public class that count as its API besides the public ones.
_DUNDER_API = ("__init__", "__call__")


def public_callables(module: types.ModuleType) -> list[tuple[str, object]]:
    """``(qualified name, function)`` for every public function of ``module``
    and every public method (with ``__init__`` and ``__call__``) of its public
    classes, as resolved on the class, where the library defines it.

    Methods that ``NamedTuple`` or ``dataclasses`` generate, and those
    inherited from other packages (``nnx.Module``), are not the library's.
    """
    found = []
    for public in public_names(module):
        value = getattr(module, public)
        qualified = f"{module.__name__}.{public}"
        if isinstance(value, types.ModuleType):
            continue
        if inspect.isclass(value):
            methods = {}
            for klass in reversed(value.__mro__):
                if klass.__module__.split(".")[0] != "optax_wa":
                    continue
                for attr, member in vars(klass).items():
                    if attr.startswith("_") and attr not in _DUNDER_API:
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    elif isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member):
                        methods[attr] = member  # a subclass overrides its base
                    else:
                        methods.pop(attr, None)
            for attr, member in sorted(methods.items()):
                if member.__code__.co_filename.startswith("<"):
                    continue  # generated (NamedTuple, dataclasses) from a string
                found.append((f"{qualified}.{attr}", member))
        elif callable(value):
            found.append((qualified, value))
    return found


def missing_annotations(fn: object) -> list[str]:
    """The parameters of ``fn`` without an annotation, and ``"return"`` when
    its return is not annotated (``self``/``cls`` of a method need none)."""
    signature = inspect.signature(inspect.unwrap(fn))
    missing = [
        parameter.name
        for i, parameter in enumerate(signature.parameters.values())
        if parameter.annotation is inspect.Parameter.empty
        and not (i == 0 and parameter.name in ("self", "cls"))
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_is_annotated(name):
    module = importlib.import_module(name)
    unannotated = [
        f"{qualified}: {', '.join(missing)}"
        for qualified, fn in public_callables(module)
        if (missing := missing_annotations(fn))
    ]
    assert not unannotated, "public functions without annotations:\n" + "\n".join(
        unannotated
    )


def test_the_annotation_rule_sees_every_function():
    """The library has many public functions and the rule reaches its methods."""
    found = [
        (qualified, inspect.unwrap(fn))
        for name in MODULES
        for qualified, fn in public_callables(importlib.import_module(name))
    ]
    assert len({id(fn) for _, fn in found}) > 100
    names = {qualified for qualified, _ in found}
    assert "optax_wa.slimmable.SlimmableLinear.__call__" in names
    assert "optax_wa.permutation.PermutationSpec.__init__" not in names  # generated
    assert not any(n.startswith("optax_wa.AveragingState.") for n in names)


def test_the_annotation_rule_sees_a_missing_annotation(tmp_path, monkeypatch):
    """The rule above names an unannotated parameter and return (it can fail)."""
    (tmp_path / "fake_annotated_mod.py").write_text(
        "class Model:\n"
        "    def __init__(self, size: int) -> None:\n"
        "        self.size = size\n\n"
        "    def __call__(self, x):\n"
        "        return x\n\n"
        "    def _helper(self, y):\n"
        "        return y\n\n"
        "def full(a: int, *args: int, b: str = '', **kwargs: float) -> int:\n"
        "    return a\n\n"
        "def partial(a: int, b) -> int:\n"
        "    return a\n\n"
        "def no_return(a: int):\n"
        "    return a\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fake_annotated_mod")
    module.__all__ = ["Model", "full", "partial", "no_return"]
    module.Model.__module__ = "optax_wa.fake"  # only the library's classes are walked
    found = dict(public_callables(module))
    assert sorted(found) == [
        "fake_annotated_mod.Model.__call__",
        "fake_annotated_mod.Model.__init__",
        "fake_annotated_mod.full",
        "fake_annotated_mod.no_return",
        "fake_annotated_mod.partial",
    ]
    assert missing_annotations(found["fake_annotated_mod.full"]) == []
    assert missing_annotations(found["fake_annotated_mod.Model.__init__"]) == []
    assert missing_annotations(found["fake_annotated_mod.Model.__call__"]) == [
        "x",
        "return",
    ]
    assert missing_annotations(found["fake_annotated_mod.partial"]) == ["b"]
    assert missing_annotations(found["fake_annotated_mod.no_return"]) == ["return"]
