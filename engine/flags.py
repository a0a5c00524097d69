"""One mapping between typed config dataclasses, command-line flags and config files.

A config is a tree of dataclasses (``TrainConfig`` holds a ``PipelineConfig`` that holds a
``ClusterConfig``, and an ``OptimConfig``). Each leaf field is one *key*: its field name,
or ``metadata["flag"]`` where the flag is spelled otherwise (``placement_timeout_s`` is
``--placement-timeout``). The same key is

- the flag ``--key-with-dashes`` (type, default, help and choices read from the field:
  ``field(metadata={"help": ..., "choices": (...), "default_help": ...})``),
- a top-level key of a TOML config file (``steps = 3``), or a key in the section of its
  sub-config (``[optim]`` ``lr = 0.1``),
- a keyword of the root class: ``@flat_init`` lets ``TrainConfig(lr=0.1)`` route ``lr``
  into its ``optim`` (and ``cfg.lr`` reads it back).

Why one mapping: flags, files, the ``--json`` report's ``config`` and the Python keywords
cannot drift apart when they are all read off the same fields. Keys are unique across a
tree (checked), so a flat mapping loses nothing.

Values are checked here only for their *type* (a file's ``steps = "x"``, a flag's
``--steps x``); what a value means (``steps >= 1``, an unknown placement) is checked once,
in the dataclasses' ``__post_init__``; :func:`check_choices` does it for fields with
``choices`` metadata.
"""

from __future__ import annotations

import argparse
import functools
import json
import types
import typing
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from .errors import PipelineConfigError

__all__ = ["Leaf", "leaves", "accepts", "flat_init", "add_dataclass_flags", "dataclass_from_args",
           "flag_values", "load_config_file", "flat_dict", "to_toml", "check_choices",
           "flag_of", "convert", "markdown_table"]


@dataclass(frozen=True)
class Leaf:
    """One key of a config tree: where it lives and how it is typed."""

    key: str  # file key and keyword (``placement_timeout``)
    path: tuple[str, ...]  # field names from the root (``("pipeline", "cluster", ...)``)
    field: Field
    tp: Any  # the resolved annotation
    owner: type  # the dataclass that declares the field
    note: str = ""  # put before the help: the rules a collected option belongs to

    @property
    def help(self) -> str:
        return self.note + self.field.metadata.get("help", "")

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def default(self) -> Any:
        f = self.field
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:  # type: ignore[misc]
            return f.default_factory()  # type: ignore[misc]
        return None

    @property
    def choices(self) -> tuple | None:
        return self.field.metadata.get("choices")


def _key(f: Field) -> str:
    return str(f.metadata.get("flag", f.name)).lstrip("-").replace("-", "_")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _subconfig(cls: type, f: Field) -> type | None:
    """The dataclass type of field ``f`` if it is a section (a nested config)."""
    tp = _hints(cls).get(f.name)
    return tp if isinstance(tp, type) and is_dataclass(tp) else None


def _keys_from(f: Field) -> tuple[type, ...]:
    """Dataclasses whose flagged leaves a dict field collects (``TrainConfig.options``: the
    rules' options classes)."""
    source = f.metadata.get("keys_from")
    return tuple(source()) if source else ()


def _flagged(k: type) -> list[Field]:
    """The fields of a collected class that are flags (``metadata["flag"]``); the others
    are Python keywords only."""
    return [g for g in fields(k) if g.metadata.get("flag")]


@functools.cache
def _tree(cls: type) -> tuple[dict[str, Leaf], dict[str, tuple[str, ...]]]:
    """Every leaf of ``cls`` by key, and every section by name (its path)."""
    out: dict[str, Leaf] = {}
    sections: dict[str, tuple[str, ...]] = {}

    def add(leaf: Leaf) -> None:
        if leaf.key in out and out[leaf.key].owner is not leaf.owner:
            raise TypeError(f"config key {leaf.key!r} is declared twice in {cls.__name__} "
                            f"({out[leaf.key].owner.__name__}, {leaf.owner.__name__})")
        out.setdefault(leaf.key, leaf)

    def walk(c: type, path: tuple[str, ...]) -> None:
        hints = _hints(c)
        for f in fields(c):
            if not f.init or f.metadata.get("derived"):
                continue
            sub = _subconfig(c, f)
            if sub is not None:
                sections[f.name] = path + (f.name,)
                walk(sub, path + (f.name,))
                continue
            extra = _keys_from(f)
            if extra:
                sections[f.name] = path + (f.name,)
                owners = f.metadata.get("key_owners")
                for k in extra:
                    for g in _flagged(k):
                        note = "/".join(owners(_key(g))) + ": " if owners else ""
                        add(Leaf(_key(g), path + (f.name, _key(g)), g, _hints(k)[g.name], k,
                                 note))
                continue
            add(Leaf(_key(f), path + (f.name,), f, hints[f.name], c))

    walk(cls, ())
    return out, sections


def leaves(cls: type) -> dict[str, Leaf]:
    """Every leaf key of config class ``cls`` (nested configs included)."""
    return _tree(cls)[0]


@functools.cache
def _names(cls: type) -> frozenset[str]:
    """Every name ``cls``'s keywords accept: keys, field names, sections, own fields."""
    tree, sections = _tree(cls)
    return frozenset({*tree, *(leaf.path[-1] for leaf in tree.values()), *sections,
                      *(f.name for f in fields(cls) if f.init)})


def accepts(cls: type, name: str) -> bool:
    """Whether ``name`` is a keyword of config class ``cls`` (its own or a nested one's)."""
    return name.replace("-", "_") in _names(cls)


# -- Python keywords -----------------------------------------------------------------------

def flat_init(cls: type) -> type:
    """Let a config dataclass take its nested configs' keys as keywords, and read them.

    ``TrainConfig(lr=0.1, address="auto")`` builds its ``optim`` and ``pipeline.cluster``
    from those keys; a nested config may also be given whole (``optim=OptimConfig(...)``)
    or as a dict (a file's section). ``cfg.lr`` reads ``cfg.optim.lr``.
    """
    nested_init = cls.__init__

    @functools.wraps(nested_init)
    def __init__(self, **values: Any) -> None:
        nested_init(self, **_route(cls, values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        leaf = leaves(cls).get(name)
        if leaf is None or len(leaf.path) < 2:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")
        obj: Any = self
        for part in leaf.path[:-1]:
            obj = getattr(obj, part)
        if isinstance(obj, dict):
            if leaf.path[-1] not in obj:
                raise AttributeError(f"{name!r} is not set (the method has no such option)")
            return obj[leaf.path[-1]]
        return getattr(obj, leaf.path[-1])

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return cls


def _unknown(cls: type, key: str) -> PipelineConfigError:
    valid = sorted(leaves(cls)) + sorted(f"[{s}]" for s in _tree(cls)[1])
    return PipelineConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")


def _route(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``cls``'s own fields from keys of its whole tree."""
    own = {f.name: f for f in fields(cls) if f.init}
    by_key = {_key(f): f.name for f in own.values()}
    out: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        name = name if name in own else by_key.get(name, name)
        if name in own:
            f = own[name]
            if (_subconfig(cls, f) or _keys_from(f)) and isinstance(value, dict):
                sub.setdefault(name, {}).update(value)  # a section
            else:
                out[name] = value
            continue
        home = _home(cls, own, name)
        if home is None:
            raise _unknown(cls, key)
        sub.setdefault(home, {})[name] = value
    for name, vals in sub.items():
        f = own[name]
        given = out.get(name)
        if given is not None and not isinstance(given, dict):
            if not is_dataclass(given):
                raise PipelineConfigError(f"{name}={given!r} must be a mapping")
            vals = {**_as_keys(given), **vals}  # an object plus some of its keys
        sub_cls = _subconfig(cls, f)
        if sub_cls is not None:
            out[name] = sub_cls(**_route(sub_cls, vals))
        else:
            valid = {_key(g) for k in _keys_from(f) for g in _flagged(k)}
            for k in vals:
                if k.replace("-", "_") not in valid:
                    raise _unknown(cls, k)
            out[name] = {k.replace("-", "_"): v for k, v in vals.items()}
    return out


def _home(cls: type, own: dict[str, Field], name: str) -> str | None:
    """The field of ``cls`` whose subtree holds key or section ``name``."""
    for fname, f in own.items():
        sub = _subconfig(cls, f)
        if sub is not None and name in _names(sub):
            return fname
        if _keys_from(f) and any(name == _key(g) for k in _keys_from(f) for g in _flagged(k)):
            return fname
    return None


def _as_keys(obj: Any) -> dict[str, Any]:
    """A config object's own init fields as keywords (nested objects kept whole)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.init}


# -- types ---------------------------------------------------------------------------------

def _parts(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); other annotations -> (tp, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return tp, False


def _is_int_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list and typing.get_args(tp) == (int,)


def _what(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if _is_int_list(tp):
        return "comma-separated integers, e.g. 2,3 (in a file: [2, 3])"
    return "a value"


def convert(leaf: Leaf, value: Any, source: str) -> Any:
    """``value`` (command-line text, or a file's typed value) as the leaf's type, or a
    one-line error naming ``source`` (``--steps`` or ``run.toml: steps``) and the type."""
    tp, optional = _parts(leaf.tp)
    if value is None:
        if optional:
            return None
        raise PipelineConfigError(f"{source} cannot be empty; give {_what(tp)}")
    text = value if isinstance(value, str) else None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in ("true", "false"):
                return text.lower() == "true"
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if text is not None:
                return int(text)
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if text is not None:
                return float(text)
        elif tp is str:
            if text is not None:
                return text
        elif _is_int_list(tp):
            if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in value):
                return list(value)
            if text is not None:
                return [int(v) for v in text.split(",") if v.strip()]
        else:  # a union such as int | str, or int | list[int]: the dataclass decides
            parse = leaf.field.metadata.get("parse")
            if text is not None and parse is not None:
                tp = parse
                return parse(text)
            return value
    except ValueError:
        pass
    raise PipelineConfigError(f"{source} {value!r} must be {_what(tp)}")


def check_choices(obj: Any) -> None:
    """Lower-case every field with ``choices`` metadata and refuse values outside them
    (one line: the flag, the value, the valid ones)."""
    for f in fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if not choices or value is None:
            continue
        low = str(value).lower()
        if low not in choices:
            label = f.metadata.get("what", f.name.replace("_", " "))
            plural = f.metadata.get("plural", label + "s")
            raise PipelineConfigError(
                f"unknown {label} {value!r}; valid {plural}: {', '.join(choices)}")
        setattr(obj, f.name, low)


def flag_of(cls: type, name: str) -> str:
    """The flag of field ``name`` of ``cls`` (for messages: ``--placement-timeout``)."""
    for f in fields(cls):
        if f.name == name:
            return "--" + _key(f).replace("_", "-")
    raise KeyError(name)


# -- flags ---------------------------------------------------------------------------------

def _shown(leaf: Leaf) -> str:
    meta = leaf.field.metadata
    if "default_help" in meta:
        return meta["default_help"]
    value = leaf.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add a flag per leaf of ``cls`` (nested configs included) to ``parser``, in one
    help group per dataclass (its name and the first line of its docstring).

    ``--prefix-key`` (``prefix="dni"``: ``--dni-sg-lr``); the parsed attribute is absent
    unless the flag is given (so a config file's value is overridden only by a flag the
    user typed). Values are converted by :func:`convert`: a bad one is a one-line error.
    """
    groups: dict[type, argparse._ArgumentGroup] = {}
    for leaf in leaves(cls).values():
        if leaf.owner not in groups:
            doc = (leaf.owner.__doc__ or "").strip().splitlines()
            groups[leaf.owner] = parser.add_argument_group(
                leaf.owner.__name__, doc[0].replace("``", "") if doc else None)
        group = groups[leaf.owner]
        meta = leaf.field.metadata
        if meta.get("flag") is False or meta.get("no_flag"):
            continue
        flag = "--" + (f"{prefix}-" if prefix else "") + leaf.key.replace("_", "-")
        tp, _ = _parts(leaf.tp)
        text = f"{leaf.help} (default: {_shown(leaf)})".strip()
        kwargs: dict[str, Any] = dict(dest=_dest(leaf, prefix), default=argparse.SUPPRESS,
                                      help=text.replace("%", "%%"))
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = meta.get("metavar") or ("{" + ",".join(leaf.choices) + "}"
                                                         if leaf.choices else None)
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
        group.add_argument(flag, **kwargs)


def _dest(leaf: Leaf, prefix: str) -> str:
    return (f"{prefix}_" if prefix else "") + leaf.key


def flag_values(ns: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The leaves of ``cls`` given as flags in ``ns``, converted, by key."""
    out = {}
    for key, leaf in leaves(cls).items():
        dest = _dest(leaf, prefix)
        if hasattr(ns, dest):
            flag = "--" + (f"{prefix}-" if prefix else "") + key.replace("_", "-")
            out[key] = convert(leaf, getattr(ns, dest), flag)
    return out


def dataclass_from_args(cls: type, ns: argparse.Namespace, prefix: str = "",
                        base: dict[str, Any] | None = None) -> Any:
    """An instance of ``cls`` from ``base`` keys overridden by the flags given in ``ns``."""
    values = {**(base or {}), **flag_values(ns, cls, prefix)}
    return cls(**values)


def markdown_table(cls: type) -> str:
    """The flags of ``cls`` as a Markdown table (flag, default, meaning), one row per key,
    grouped by the dataclass that declares them: the README's flags table is this."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    owner = None
    for leaf in leaves(cls).values():
        if leaf.owner is not owner:
            owner = leaf.owner
            rows.append(f"| **{owner.__name__}** | | |")
        text = leaf.help
        if leaf.choices:
            text += f" ({' / '.join(leaf.choices)})"
        rows.append(f"| `{leaf.flag}` | {_shown(leaf)} | {text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


# -- files ---------------------------------------------------------------------------------

def load_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """The keys of a TOML config file (or a JSON file: a ``--json`` report's ``config``,
    or a bare mapping), flattened, type-checked, by key. Unknown keys and sections are an
    error naming them and the valid ones."""
    p = Path(path)
    if not p.is_file():
        raise PipelineConfigError(f"--config {str(path)!r} does not exist; give a .toml file")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PipelineConfigError(f"--config {str(path)!r} is not JSON: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]  # a `brigade train --json` report
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise PipelineConfigError(f"--config {str(path)!r} is not TOML: {err}") from None
    if not isinstance(data, dict):
        raise PipelineConfigError(f"--config {str(path)!r} must hold a table of keys")
    return _flatten(cls, data, p.name, ())


def _flatten(cls: type, data: dict, source: str, section: tuple[str, ...]) -> dict[str, Any]:
    """File keys (top level and sections) as ``{key: value}``; a section's keys must
    belong to it."""
    tree, sections = _tree(cls)
    out: dict[str, Any] = {}
    for raw, value in data.items():
        key = raw.replace("-", "_")
        where = f"{source}: " + ".".join((*section, raw))
        if key in sections and isinstance(value, dict) and key not in tree:
            if section and sections[key][:len(section)] != section:
                raise _section_error(where, section, cls)
            out.update(_flatten(cls, value, source, sections[key]))
            continue
        leaf = tree.get(key)
        if leaf is None or (section and leaf.path[:len(section)] != section):
            if leaf is None:
                err = _unknown(cls, raw)
                raise PipelineConfigError(f"{where}: {err}")
            raise _section_error(where, section, cls)
        out[key] = convert(leaf, value, where)
    return out


def _section_error(where: str, section: tuple[str, ...], cls: type) -> PipelineConfigError:
    valid = [k for k, leaf in leaves(cls).items() if leaf.path[:len(section)] == section]
    return PipelineConfigError(f"{where} is not a key of section [{'.'.join(section)}]; its "
                               f"keys: {', '.join(sorted(valid))}")


def flat_dict(obj: Any, cls: type | None = None) -> dict[str, Any]:
    """Every leaf of a config object by key: the form a config file's top level takes
    (and what ``--json`` reports as ``config``; fed back, it gives the same config)."""
    cls = cls or type(obj)
    out = {}
    for key, leaf in leaves(cls).items():
        value: Any = obj
        for part in leaf.path:
            if isinstance(value, dict):
                if part not in value:
                    break
                value = value[part]
            else:
                value = getattr(value, part)
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def to_toml(values: dict[str, Any]) -> str:
    """Flat ``{key: value}`` as TOML (None values are left out: TOML has no null, and a
    left-out key takes its default)."""
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise PipelineConfigError(f"cannot write {value!r} as TOML")

