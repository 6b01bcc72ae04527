"""Command-line flags made from a settings model: one flag per field, its name, type, default
and help taken from the field, so each default is written once (in the model).

A flag given on the command line wins over the environment, which wins over the default
(pydantic-settings' order for init values, env and defaults): flags left out are not passed.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """`--some-field` for each field; a bool field gives `--x` and `--no-x`."""
    for name, field in model.model_fields.items():
        kind = _plain(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = "required, or from the env" if field.is_required() else f"default {default!r}"
        options: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": f"{field.description or name} ({shown})".replace("%", "%%"),
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["type"] = kind
            options["metavar"] = "PATH" if kind is Path else name.upper()
        parser.add_argument(flag_name(name), **options)


M = TypeVar("M", bound=BaseModel)


def settings_from(parser: argparse.ArgumentParser, args: argparse.Namespace, model: type[M]) -> M:
    """The settings, from the flags given (and the env, for the rest); a value that does not
    validate stops the command with an error naming the flag and the value."""
    given = {name: value for name, value in vars(args).items() if name in model.model_fields}
    try:
        return model(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            where = flag_name(name) if name else "settings"
            value = f" (got {error['input']!r})" if error["type"] != "missing" else ""
            problems.append(f"{where}: {error['msg']}{value}")
        parser.error("; ".join(problems))


def _plain(annotation: Any) -> Any:
    """`X | None` -> X: the type a flag's text is parsed into."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return options[0] if len(options) == 1 else str
    return annotation
