"""Options declared once: dataclass fields whose help builds the CLI and the docstrings.

An option is a dataclass field with its help in the metadata (peft's
``field(metadata={"help": ...})`` pattern).  :func:`add_dataclass_arguments`
turns the fields into ``argparse`` options, :func:`options_from_args` reads
them back, and :func:`document_options` writes the same help into a
function's numpy-style docstring, so each help sentence and each default
exists in one place.  This module imports nothing from the package.

Metadata keys
-------------
help : str
    The help sentence (lower case, no final period, as argparse shows it).
    ``%(default)s`` becomes the field's default, in the CLI and the docs.
flag : str
    The CLI flag when it is not ``--field-name``.  A ``bool`` field is a
    switch: ``store_true`` when it defaults to ``False``, else ``store_false``
    (e.g. ``--no-cache`` for ``cache=True``).
cli_help : str
    The CLI help when it must differ from ``help`` (switches that turn an
    option off).
type, choices, metavar
    As in :meth:`argparse.ArgumentParser.add_argument`.
group : str
    Options of one mutually exclusive group; ``required: True`` on its
    members makes the group required.  Outside a group, a field without a
    default is a required option.
doc : str
    More text for the docstring only (Python-side details).
doc_type : str
    The type written in the docstring (default: from the annotation).
cli : bool
    ``False`` keeps the field out of the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "PLACEHOLDER", "add_dataclass_arguments", "document_options", "flag", "non_negative_float",
    "non_negative_int", "option_fields", "options_from_args", "parameter_docs", "positive_float",
    "positive_int",
]


PLACEHOLDER = "{options}"  # the docstring line that document_options replaces


# -- argparse types -------------------------------------------------------------
def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


# -- fields ---------------------------------------------------------------------
def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that carry help."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _cli_fields(cls):
    return [f for f in option_fields(cls) if f.metadata.get("cli", True)]


def _help(f, key="help"):
    text = f.metadata.get(key, f.metadata["help"])
    return text if f.default is dataclasses.MISSING else text.replace("%(default)s", str(f.default))


def flag(f: dataclasses.Field) -> str:
    """The CLI flag of a field."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


# -- argparse ---------------------------------------------------------------------
def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, use_defaults: bool = True) -> None:
    """Add one option per field of dataclass ``cls`` (see the module docstring for the metadata).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser (or subparser) to extend.
    cls : type
        A dataclass whose fields carry ``metadata={"help": ...}``.
    use_defaults : bool
        ``False``: options (not switches) default to ``None``, so that a caller
        passes on only what was given and the library applies its own defaults.
    """
    groups = {}
    for f in _cli_fields(cls):
        meta, default = f.metadata, f.default  # MISSING: none, or a default_factory
        kwargs = {"dest": f.name, "help": _help(f, "cli_help")}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["default"] = default if use_defaults and default is not dataclasses.MISSING else None
            kwargs.update({k: meta[k] for k in ("type", "choices", "metavar") if k in meta})
        target = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=bool(meta.get("required")))
            target = groups[meta["group"]]
        elif default is dataclasses.MISSING or meta.get("required"):
            kwargs["required"] = True
        target.add_argument(flag(f), **kwargs)


def options_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s CLI options in parsed ``args``, by field name."""
    return {f.name: getattr(args, f.name) for f in _cli_fields(cls) if hasattr(args, f.name)}


# -- docstrings -------------------------------------------------------------------
def _doc_type(f):
    if "doc_type" in f.metadata:
        return f.metadata["doc_type"]
    optional = ", optional" if f.default is None else ""
    if "choices" in f.metadata:
        return "{" + ", ".join(f'"{c}"' for c in f.metadata["choices"]) + "}" + optional
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return " or ".join(p.strip() for p in kind.split("|") if p.strip() != "None") + optional


def _python_spelling(classes):
    """CLI flag -> its spelling in Python docs: ``max_steps``, or ``cache=False`` for ``--no-cache``."""
    names = {}
    for cls in classes:
        for f in _cli_fields(cls):
            switch = isinstance(f.default, bool) and flag(f) != "--" + f.name.replace("_", "-")
            names[flag(f)] = f"``{f.name}={not f.default}``" if switch else f"``{f.name}``"
    return names


def _doc_text(f, spelling):
    text = _help(f).replace("%%", "%")
    text = re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", lambda m: spelling.get(m.group(0), m.group(0)), text)
    if text[1:2].islower():  # a sentence, not a name such as m3gnet
        text = text[:1].upper() + text[1:]
    text = text if text.endswith(".") else text + "."
    return f"{text} {f.metadata['doc']}" if "doc" in f.metadata else text


def parameter_docs(fields: Iterable[dataclasses.Field], indent: str = "", classes: Iterable[type] = ()) -> str:
    """Numpy-style parameter entries for ``fields`` (help, then any ``doc``)."""
    spelling = _python_spelling(classes)
    body = indent + "    "
    lines = []
    for f in fields:
        lines.append(f"{indent}{f.name} : {_doc_type(f)}")
        lines.extend(textwrap.wrap(_doc_text(f, spelling), width=max(88, len(body) + 40),
                                   initial_indent=body, subsequent_indent=body, break_on_hyphens=False,
                                   break_long_words=False))
    return "\n".join(lines)


def _check_defaults(func, fields):
    """A parameter that is an option must default to the option's default: one source."""
    params = inspect.signature(func).parameters
    for f in fields:
        if f.name in params and f.default is not dataclasses.MISSING and params[f.name].default != f.default:
            raise TypeError(f"{func.__qualname__}: {f.name}={params[f.name].default!r} differs from "
                            f"the option's default {f.default!r}")


def document_options(*classes: type, check_defaults: bool = True) -> Callable:
    """Decorator: write the help of ``classes``' fields into the function's docstring.

    The docstring line ``{options}`` becomes a numpy-style entry for each field
    that is a parameter of the function (every field when it takes
    ``**kwargs``), indented like that line.  With ``check_defaults``, each such
    parameter must default to its field's default (checked on import).
    """

    def decorate(func):
        params = inspect.signature(func).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        fields = [f for cls in classes for f in option_fields(cls) if takes_any or f.name in params]
        if check_defaults:
            _check_defaults(func, fields)
        if func.__doc__ and PLACEHOLDER in func.__doc__:  # no docstrings under python -OO
            lines = func.__doc__.split("\n")
            at = next(i for i, line in enumerate(lines) if line.strip() == PLACEHOLDER)
            indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
            lines[at] = parameter_docs(fields, indent, classes)
            func.__doc__ = "\n".join(lines)
        return func

    return decorate
