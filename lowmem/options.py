"""Command-line options generated from a configuration dataclass: one flag per field.

A field's flag, type and help come from the field itself (its annotation, its default and the
docstring written under it in the class), so the command line never keeps a second copy of
the configuration to drift from it. Values arrive as strings and are typed by
`lowmem.config.parse_value` when the configuration is built, so a bad value gets the same
one-line error as anywhere else ("bad quant_bits='x': must be an integer").
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it in the class body} (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:], strict=False):
        doc = getattr(after, "value", None)
        if isinstance(stmt, ast.AnnAssign) and isinstance(doc, ast.Constant):
            if isinstance(doc.value, str):
                docs[stmt.target.id] = " ".join(doc.value.split())
    return docs


def add_field_options(parser: argparse.ArgumentParser, cls: type, skip: tuple = ()) -> None:
    """`--field-name VALUE` for every field of the dataclass `cls` not in `skip`; unset ones
    stay None in the parsed namespace (the class default applies)."""
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields, one flag each")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, tuple) else default
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar="A,B" if f.type.startswith("tuple") else f.type.upper(),
            help=f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%"),
        )


def given_fields(args: argparse.Namespace, cls: type) -> dict[str, str]:
    """The raw strings of the field options the user gave."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
