"""Command-line options and notebook parameters generated from a configuration dataclass.

A setting's flag, type and help come from the field itself (its annotation, its default and
the docstring written under it in its class; `lowmem.settings.flat_fields`), so the command
line never keeps a second copy of the configuration to drift from it. The same holds for the
papermill parameters of `notebooks/run_cell.ipynb`: its parameters cell ends with
`field_parameters(StackConfig)`, written by `python -m lowmem.options` (a test fails until it
is rerun after a field changes). Values arrive as strings and are typed by
`lowmem.settings.parse_value` when the configuration is built, so a bad value gets the same
one-line error as anywhere else ("bad quant_bits='x': must be an integer").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

from lowmem.settings import flat_fields


def add_field_options(parser: argparse.ArgumentParser, cls: type, skip: tuple = ()) -> None:
    """`--setting-name VALUE` for every flat setting of the dataclass `cls` (its sections
    flattened, `lowmem.settings.flat_fields`) not in `skip`; unset ones stay None in the parsed
    namespace (the class default applies)."""
    group = parser.add_argument_group(f"{cls.__name__} settings, one flag each")
    for f in flat_fields(cls).values():
        if f.name in skip:
            continue
        shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar="A,B" if f.type.startswith("tuple") else f.type.upper(),
            help=f"{f.doc} (default: {shown})".replace("%", "%%"),
        )


def given_fields(args: argparse.Namespace, cls: type) -> dict[str, str]:
    """The raw strings of the setting options the user gave."""
    return {
        name: getattr(args, name)
        for name in flat_fields(cls)
        if getattr(args, name, None) is not None
    }


def field_parameters(cls: type) -> str:
    """One `name = default  # doc` line per flat setting: a notebook's papermill parameters. A
    tuple default is written comma-joined, as the configuration reads it back. An "=" in the
    doc becomes "is": papermill skips a parameter line with two "=" (and then calls the
    parameter unknown)."""
    lines = []
    for f in flat_fields(cls).values():
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        line = f"{f.name} = {default!r}  # "
        doc = re.sub(r"\s*=\s*", " is ", f.doc or f"{cls.__name__}.{f.name}")
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
