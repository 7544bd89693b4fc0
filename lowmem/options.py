"""Command-line options and notebook parameters generated from a configuration dataclass.

A field's flag, type and help come from the field itself (its annotation, its default and the
docstring written under it in the class), so the command line never keeps a second copy of the
configuration to drift from it. The same holds for the papermill parameters of
`notebooks/run_cell.ipynb`: its parameters cell ends with `field_parameters(StackConfig)`,
written by `python -m lowmem.options` (a test fails until it is rerun after a field changes).
Values arrive as strings and are typed by `lowmem.config.parse_value` when the configuration is
built, so a bad value gets the same one-line error as anywhere else ("bad quant_bits='x': must
be an integer").
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import sys
import textwrap
from pathlib import Path


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


def field_parameters(cls: type) -> str:
    """One `name = default  # doc` line per field: a notebook's papermill parameters. A tuple
    default is written comma-joined, as the configuration reads it back."""
    docs, lines = field_docs(cls), []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = ",".join(default) if isinstance(default, tuple) else default
        line = f"{f.name} = {default!r}  # "
        doc = docs.get(f.name, f"{cls.__name__}.{f.name}")
        lines.append(line + textwrap.shorten(doc, max(20, 100 - len(line)), placeholder="..."))
    return "\n".join(lines) + "\n"


RUN_NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "run_cell.ipynb"
_FIELDS_MARK = "# StackConfig fields (python -m lowmem.options writes the lines below)\n"


def write_run_parameters(notebook: Path = RUN_NOTEBOOK) -> None:
    """Rewrite the field lines of the notebook's parameters cell from StackConfig."""
    from lowmem.config import StackConfig
    from lowmem.files import write_atomic

    nb = json.loads(notebook.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    head = "".join(cell["source"]).partition(_FIELDS_MARK)[0]
    text = head + _FIELDS_MARK + field_parameters(StackConfig)
    cell["source"] = text.splitlines(keepends=True)
    write_atomic(notebook, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_run_parameters(Path(sys.argv[1]) if len(sys.argv) > 1 else RUN_NOTEBOOK)
