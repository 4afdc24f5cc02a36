"""Finding passes by name: built-ins, `q4c.passes` entry points, and `module:Class` specs."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from dataclasses import dataclass

from q4c.errors import ConfigError
from q4c.pipeline import Pass

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
