"""Config dataclasses as settings: their flags, help, choices and nesting, read from the fields themselves.

A config class is a ``@dataclass(kw_only=True, slots=True)`` whose fields carry everything a setting needs: the type
(``Literal[...]`` for a closed set of names), the default, and a docstring written under the field. This module reads
them, so the CLI (:mod:`._cli_config`), the validation messages and the JSON form never restate a default, a choice or
a help text. A field may refine its command-line form with ``dataclasses.field(metadata=...)``:

- ``flag``: the option name when it is not ``--field-name`` (``--out`` for ``out_dir``); kept for names users know.
- ``metavar``: the placeholder shown in ``--help``.
- ``cli``: False for a field that is not a user setting (set by the program, or by another flag).

A *tree* nests configs: a field whose type is a config class is a group, and the group's fields are settings of the
tree, named by their leaf name (which is unique within the tree, so ``TrainConfig(stages=4)`` and ``--stages 4`` name
exactly one setting).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from ._errors import ConfigError

__all__ = ["Setting", "build_tree", "check_choices", "field_docs", "flag_of", "settings_of"]


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One leaf field of a config tree, with what the CLI and the error messages need to know about it."""

    field: dataclasses.Field[Any]
    owner: type
    """The config class that declares the field."""
    group: str | None
    """Name of the group field holding it in the tree (None for a top-level field)."""
    annotation: Any
    """The field's resolved type."""
    doc: str
    """The field's docstring (one paragraph, ``markup`` removed)."""

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def flag(self) -> str:
        return str(self.field.metadata.get("flag", "--" + self.name.replace("_", "-")))

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and self.field.default_factory is dataclasses.MISSING

    @property
    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None if self.field.default is dataclasses.MISSING else self.field.default

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The names a ``Literal`` (or optional ``Literal``) annotation allows."""
        inner = strip_optional(self.annotation)
        return get_args(inner) if get_origin(inner) is Literal else None


def strip_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (other annotations unchanged)."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of ``cls`` (and of its dataclass bases), by field name.

    Read from the source with :mod:`ast` (by module and class name, which also finds ``slots=True`` classes that
    :func:`dataclasses.dataclass` recreated); empty when the source is not available (a frozen application).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(sys.modules[klass.__module__]))
        except (OSError, TypeError, KeyError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == klass.__name__:
                body = node.body
                for stmt, nxt in itertools.pairwise(body):
                    if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                            and isinstance(nxt.value.value, str)):
                        docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
                break
    return docs


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """Every leaf setting of the config tree ``cls``, in field order (a group's settings where the group is)."""
    out: list[Setting] = []

    def walk(klass: type, group: str | None) -> None:
        hints = typing.get_type_hints(klass)
        docs = field_docs(klass)
        for f in dataclasses.fields(klass):
            if is_config(hints[f.name]):
                if group is not None:
                    raise TypeError(f"{cls.__name__}: groups nest one level deep ({group}.{f.name})")
                walk(hints[f.name], f.name)
            else:
                out.append(Setting(field=f, owner=klass, group=group, annotation=hints[f.name],
                                   doc=docs.get(f.name, "").replace("``", "")))

    walk(cls, None)
    hints = typing.get_type_hints(cls)
    names = [s.name for s in out] + [f.name for f in dataclasses.fields(cls) if is_config(hints[f.name])]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{cls.__name__}: setting names must be unique in the tree, {twice} repeat")
    return tuple(out)


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of setting ``name`` of ``cls`` (for messages that say what to change)."""
    for s in settings_of(cls):
        if s.name == name:
            return s.flag
    raise KeyError(name)


def check_choices(config: Any) -> None:
    """Raise :class:`ConfigError` naming the flag when a ``Literal`` field of ``config`` holds another value."""
    for s in settings_of(type(config)):
        if s.group is None and s.owner is type(config):
            value = getattr(config, s.name)
            if s.choices is not None and value not in s.choices and not (value is None and s.default is None):
                raise ConfigError(f"{s.name} must be one of {', '.join(map(str, s.choices))}, got {value!r}; "
                                  f"set {s.flag}")


def build_tree(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """The field values of the config tree ``cls`` from ``settings``: its own fields, whole groups (a config or a
    dict), and any leaf setting by name (applied on top of its group), e.g. ``{"model": m, "stages": 4}``."""
    hints = typing.get_type_hints(cls)
    groups = {f.name: hints[f.name] for f in dataclasses.fields(cls) if is_config(hints[f.name])}
    leaves = {s.name: s.group for s in settings_of(cls) if s.group is not None}
    values: dict[str, Any] = {}
    overrides: dict[str, dict[str, Any]] = {g: {} for g in groups}
    for key, value in settings.items():
        if key in groups:
            values[key] = groups[key](**value) if isinstance(value, dict) else value
        elif key in leaves:
            overrides[leaves[key]][key] = value
        elif key in {f.name for f in dataclasses.fields(cls)}:
            values[key] = value
        else:
            known = [f.name for f in dataclasses.fields(cls)] + list(leaves)
            near = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"{cls.__name__} has no setting {key!r}" + (f"; did you mean {near[0]!r}?" if near
                                                                            else ""))
    for group, group_cls in groups.items():
        base = values.get(group)
        values[group] = (dataclasses.replace(base, **overrides[group]) if base is not None
                         else group_cls(**overrides[group]))
    for s in settings_of(cls):
        if s.group is None and s.name not in values:
            if s.required:
                raise ConfigError(f"{cls.__name__} needs {s.name}= ({s.doc or 'no default'})")
            values[s.name] = s.default
    return values
