"""Command-line flags derived from the kinds' spec models, and the spec values read back from them.

Every field of a kind's spec is a flag: `max_tokens` is `--max-tokens`, a nested model's fields are flags
of their own (generation's `sampling`), a bool is a switch (`--no-calibrate` when it defaults to on), a
Literal gives choices, a list is comma-separated (repeatable with `cli: append`), or read from a file:
`cli: file` (JSON or YAML), `cli: jsonl` (a list of models, a line each). A field names another
flag with `json_schema_extra={"flag": "--system"}`. Kinds that share a field share its flag. Flags default
to None, so a flag not given leaves the spec's own default in place.
"""

from __future__ import annotations

import argparse
import functools
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from schema.errors import InputError
from schema.reading import decode_line, read_lines, validate_as


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]  # where the value goes in the spec: ("sampling", "max_tokens")
    option: str  # "--max-tokens"
    options: dict[str, Any]  # add_argument's keyword arguments
    load: Callable[[str], Any] | None = None  # the flag names a file; this reads the value from it

    @property
    def dest(self) -> str:
        return "spec_" + self.option.lstrip("-").replace("-", "_")


def spec_flags(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[Flag]:
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli") == "hidden":
            continue
        base = _unwrap(field.annotation)
        if isinstance(base, type) and issubclass(base, BaseModel):
            yield from spec_flags(base, (*prefix, name))
            continue
        option = str(extra.get("flag") or "--" + name.replace("_", "-"))
        options: dict[str, Any] = {"default": None, "help": field.description}
        if base is bool:
            option = option if field.default is not True else "--no-" + option.removeprefix("--")
            options.update(action="store_const", const=field.default is not True)
        elif get_origin(base) is Literal:
            options["choices"] = list(get_args(base))
        elif extra.get("cli") == "file":
            options["metavar"] = "PATH"
            yield Flag((*prefix, name), option, options, load_structured_file)
            continue
        elif extra.get("cli") == "jsonl":  # a list of models, one per line of a JSONL file
            options["metavar"] = "PATH"
            yield Flag((*prefix, name), option, options, functools.partial(load_jsonl_as, get_args(base)[0]))
            continue
        elif get_origin(base) is list:
            options.update(action="append") if extra.get("cli") == "append" else options.update(type=split_list)
        else:
            options["type"] = base
        yield Flag((*prefix, name), option, options)


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def split_list(text: str) -> list[str]:
    """`positive,negative` -> ["positive", "negative"]; spaces around commas go."""
    return [part.strip() for part in text.split(",")] if text.strip() else []


def load_structured_file(path: str) -> Any:
    """A JSON or YAML file's content; InputError names the file (and the line where it does not parse)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, None, None, f"cannot read file: {exc}") from exc
    try:
        return yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(path, mark.line + 1 if mark else None, None,
                         f"not valid JSON or YAML: {getattr(exc, 'problem', None) or exc}") from None


MAX_LINE_BYTES = 1_000_000  # a labelled example is a text, as an input line is (GRISTMILL_MAX_LINE_BYTES' default)


def load_jsonl_as(model: type[BaseModel], path: str) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file validated as `model`; InputError names the file, line and field."""
    try:
        with open(path, "rb") as stream:
            return [validate_as(model, decode_line(raw, path, lineno), path, lineno, "").model_dump(exclude_none=True)
                    for lineno, raw in read_lines(stream, path, MAX_LINE_BYTES) if raw.strip()]
    except OSError as exc:
        raise InputError(path, None, None, f"cannot read file: {exc.strerror or exc}") from exc


FileFlags = dict[str, Callable[[str], Any]]  # field -> loader of `--<field>-file PATH`


def add_spec_flags(parser: argparse.ArgumentParser, kinds: dict[str, tuple[type[BaseModel], FileFlags]]) -> None:
    """One flag per spec field of every kind (shared where kinds share a field), its help naming the kinds."""
    by_option: dict[str, tuple[Flag, dict[str, list[str]]]] = {}  # option -> (flag, help -> kinds)
    for kind, (model, file_flags) in kinds.items():
        for flag in [*spec_flags(model), *_file_flags(file_flags)]:
            helps = by_option.setdefault(flag.option, (flag, {}))[1]
            helps.setdefault(flag.options.get("help") or "", []).append(kind)
    for option, (flag, helps) in by_option.items():
        text = "; ".join(f"{', '.join(users)}: {help_}".rstrip(": ") for help_, users in helps.items())
        metavar = {} if "choices" in flag.options else {"metavar": flag.path[-1].upper()}
        parser.add_argument(option, dest=flag.dest, **{**metavar, **flag.options, "help": text})


def _file_flags(file_flags: FileFlags) -> Iterator[Flag]:
    for field in file_flags:
        option = f"--{field.replace('_', '-')}-file"
        yield Flag((field,), option, {"default": None, "metavar": "PATH", "help": f"the {field} from a YAML file"})


def spec_values(args: argparse.Namespace, kind: str, model: type[BaseModel], file_flags: FileFlags,
                every_kind: dict[str, tuple[type[BaseModel], FileFlags]]) -> dict[str, Any]:
    """The spec values given on the command line for `kind`; InputError for a flag of another kind."""
    own = {flag.dest: flag for flag in spec_flags(model)}
    values: dict[str, Any] = {}
    for flag in own.values():
        value = getattr(args, flag.dest, None)
        if value is not None:
            _put(values, flag.path, flag.load(value) if flag.load else value)
    for field, load in file_flags.items():
        file_flag = next(_file_flags({field: load}))
        path = getattr(args, file_flag.dest, None)
        if path is not None:
            if field in values:
                raise InputError(f"--{field.replace('_', '-')}", None, None, f"give --{field} or {file_flag.option}, "
                                                                             f"not both")
            values[field] = load(path)
    _refuse_foreign(args, kind, set(own) | {f.dest for f in _file_flags(file_flags)}, every_kind)
    return values


def _refuse_foreign(args: argparse.Namespace, kind: str, own: set[str],
                    every_kind: dict[str, tuple[type[BaseModel], FileFlags]]) -> None:
    for other, (model, file_flags) in every_kind.items():
        for flag in [*spec_flags(model), *_file_flags(file_flags)]:
            if flag.dest not in own and getattr(args, flag.dest, None) is not None:
                raise InputError(flag.option, None, None, f"{flag.option} applies to --task {other}, not {kind}")


def _put(values: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        values = values.setdefault(key, {})
    values[path[-1]] = value
