"""Finding passes by name: built-ins, `q4c.passes` entry points, and `module:Class` specs."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING

from q4c.errors import ConfigError
from q4c.pipeline import Artifact, Pass

if TYPE_CHECKING:
    from q4c.config import CompileOptions

ENTRY_POINT_GROUP = "q4c.passes"


@dataclass(frozen=True)
class PassInfo:
    name: str
    origin: str  # "builtin", "entry point <dist>", or "module:Class"
    summary: str


def _builtins() -> dict[str, type[Pass]]:
    from q4c.passes import BUILTIN_PASSES

    return BUILTIN_PASSES


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def find_pass(name: str) -> type[Pass]:
    """The Pass class for a built-in name, a plugin entry-point name, or `module:Class`."""
    builtins = _builtins()
    if name in builtins:
        return builtins[name]
    if ":" in name:
        module_name, _, attr = name.rpartition(":")
        try:
            module = _load_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
            obj = getattr(module, attr)
        except (ImportError, AttributeError, OSError, SyntaxError) as e:
            raise ConfigError(f"cannot load pass {name!r}: {e}") from e
        return _checked(obj, name)
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as e:  # a broken plugin must not crash the CLI with a traceback
            raise ConfigError(f"cannot load plugin pass {name!r} ({eps[name].value}): {e}") from e
        return _checked(obj, name)
    known = ", ".join(sorted(builtins) + sorted(eps))
    raise ConfigError(f"unknown pass {name!r}; known passes: {known}; or give module:Class")


def _load_file(path: str) -> object:
    """Import a pass module from a .py file path (`--passes my_pass.py:MyPass`)."""
    file = Path(path)
    if not file.is_file():
        raise ImportError(f"no such file {path}")
    spec = importlib.util.spec_from_file_location(f"q4c_user_pass_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checked(obj: object, spec: str) -> type[Pass]:
    if not (isinstance(obj, type) and issubclass(obj, Pass)):
        raise ConfigError(f"{spec!r} is not a q4c.Pass subclass")
    if not isinstance(getattr(obj, "name", None), str):
        raise ConfigError(f"{spec!r} has no string 'name' attribute")
    if obj.name in _builtins() and _builtins()[obj.name] is not obj:
        raise ConfigError(f"plugin pass {spec!r} reuses the built-in name {obj.name!r}")
    return obj


def list_passes() -> list[PassInfo]:
    infos = [PassInfo(n, "builtin", _summary(c)) for n, c in _builtins().items()]
    for name, ep in sorted(_entry_points().items()):
        dist = ep.dist.name if ep.dist is not None else "?"
        summary = f"({ep.value})"
        if name in _builtins():
            summary = f"ERROR: reuses a built-in name ({ep.value})"
        infos.append(PassInfo(name, f"plugin {dist}", summary))
    return infos


def _summary(cls: type) -> str:
    """The docstring's first sentence, joined across lines."""
    paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    head, dot, _ = paragraph.partition(". ")
    return head + ("." if dot else "")


def resolve_pipeline(spec: str | None, default: tuple[str, ...]) -> list[str]:
    """Expand a `--passes` spec: bare names replace, `default` inserts the default pipeline,
    `+name` appends, `-name` drops."""
    if spec is None or not spec.strip():
        return list(default)
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "default":
            names.extend(default)
        elif item.startswith("+"):
            names.append(item[1:])
        elif item.startswith("-"):
            if item[1:] not in names:
                raise ConfigError(f"--passes: cannot drop {item[1:]!r}: not in the pipeline so far ({', '.join(names)})")
            names = [n for n in names if n != item[1:]]
        else:
            names.append(item)
    if not names:
        raise ConfigError("--passes leaves no pass to run")
    return names


#: built-in passes the compiler inserts when a pass needs what they provide and none came before
AUTO_PROVIDERS: dict[Artifact, str] = {
    Artifact.CALIBRATION: "calibrate",
    Artifact.FORMS: "choose-kernels",
    Artifact.INT8_ACTIVATIONS: "insert-activation-qdq",
}


def complete_pipeline(names: list[str], options: CompileOptions, wanted: frozenset[Artifact] = frozenset()) -> list[str]:
    """`names` with the providers of unmet needs inserted: each right before the first pass that
    needs it (after that provider's own needs), and `wanted` artifacts (e.g. a calibration table
    to save) before the first analysis. Needs without an automatic provider (the plan) are checked
    when the pass runs (its `requires`)."""
    names = list(names)
    for artifact in sorted(wanted, key=lambda a: a.value):
        if not any(artifact in find_pass(n).provides for n in names):
            anchor = next((i for i, n in enumerate(names) if find_pass(n).analysis or artifact in _needs(n, options)),
                          len(names))
            names.insert(anchor, AUTO_PROVIDERS[artifact])
    i = 0
    while i < len(names):
        provided = {a for n in names[:i] for a in find_pass(n).provides}
        missing = [a for a in sorted(_needs(names[i], options), key=lambda a: a.value)
                   if a not in provided and a in AUTO_PROVIDERS and AUTO_PROVIDERS[a] not in names[i:]]
        if missing:
            names.insert(i, AUTO_PROVIDERS[missing[0]])  # then its own needs, on the next turn
            continue
        i += 1
    return names


def _needs(name: str, options: CompileOptions) -> frozenset[Artifact]:
    return find_pass(name)().needs(options)
