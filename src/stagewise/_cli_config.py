"""The command line of a config dataclass, generated from its fields: one option per setting, nothing restated.

For each leaf setting of a config tree (see :mod:`._settings`): the flag is the field name (``--global-batch``) or
its ``flag`` metadata; the type comes from the annotation (``Literal`` -> ``choices``; ``bool`` -> ``--x/--no-x``;
``list``/``tuple`` -> comma-separated; ``dict`` -> a JSON object); the help is the field's docstring followed by its
default. A required field is a positional argument. A group becomes an argument group in ``--help``. So a new field
is a new option, and a changed default or doc shows in ``--help`` with no edit here.
"""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Callable
from typing import Any, get_origin

from ._settings import Setting, settings_of, strip_optional

__all__ = ["add_config_arguments", "config_values", "shown"]


class _Toggle(argparse.BooleanOptionalAction):
    """``--x/--no-x`` with our help text as given (some Pythons append the default to it themselves)."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = help


def _csv(convert: Callable[[list[str]], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return convert([part.strip() for part in text.split(",") if part.strip()])

    parse.__name__ = "comma-separated list"  # argparse names the type in its error message
    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def shown(value: Any) -> str:
    """A default as ``--help`` shows it (``none``, ``on``/``off``, ``a,b``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _argument(s: Setting) -> tuple[list[str], dict[str, Any]]:
    """argparse's ``add_argument`` arguments for setting ``s``."""
    help_text = (s.doc + ("" if s.required else f" (default: {shown(s.default)})")).replace("%", "%%")
    kwargs: dict[str, Any] = {"help": help_text}
    if "metavar" in s.field.metadata:
        kwargs["metavar"] = s.field.metadata["metavar"]
    inner = strip_optional(s.annotation)
    origin = get_origin(inner)
    if s.choices is not None:
        kwargs.update(choices=s.choices, type=type(s.choices[0]))
    elif inner is bool:
        kwargs["action"] = _Toggle
    elif origin in (list, tuple):
        kwargs.update(type=_csv(list if origin is list else tuple), metavar=kwargs.get("metavar", "A,B,..."))
    elif origin is dict or inner is dict:
        kwargs["type"] = _json_object
    elif inner in (int, float, str):
        kwargs["type"] = inner
    else:
        raise TypeError(f"setting {s.name}: no command-line form for type {s.annotation!r}")
    if s.required:
        kwargs["metavar"] = kwargs.get("metavar", s.name.upper())
        return [s.name], kwargs
    if "action" not in kwargs and "choices" not in kwargs:
        kwargs.setdefault("metavar", s.flag.lstrip("-").upper().replace("-", "_"))  # the flag's name, not the field's
    kwargs.update(dest=s.name, default=s.default)
    return [s.flag], kwargs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per command-line setting of the config tree ``cls`` (fields with ``cli=False`` are left
    to the command); a group's settings go under a heading named by the group's docstring."""
    hints = typing.get_type_hints(cls)
    headings: dict[str, Any] = {}
    for s in settings_of(cls):
        if not s.field.metadata.get("cli", True):
            continue
        target: Any = parser
        if s.group is not None:
            if s.group not in headings:
                doc = (hints[s.group].__doc__ or "").strip().splitlines()
                headings[s.group] = parser.add_argument_group(s.group, doc[0] if doc else None)
            target = headings[s.group]
        names, kwargs = _argument(s)
        target.add_argument(*names, **kwargs)


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings of ``cls`` as parsed into ``args``, by name (``TrainConfig(**values)``)."""
    return {s.name: getattr(args, s.name) for s in settings_of(cls) if s.field.metadata.get("cli", True)}
