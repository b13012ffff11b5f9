"""The `tpext` command (also `python -m tpext`): demo | bench | plan.

Each subcommand lives in its own module under tpext/commands/ and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Modules are imported only when
their subcommand runs, so `tpext plan` does not pay for what `tpext demo` needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help)
COMMANDS = {
    "demo": (
        "tpext.commands.demo",
        "train the reference model with tensor parallelism and check it against the dense one",
    ),
    "bench": ("tpext.commands.bench", "benchmark tpext's layers against PyTorch's own tensor parallelism"),
    "plan": (
        "tpext.commands.plan",
        "predict memory, communication and throughput of tensor-parallel configurations",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpext", description="Tensor parallelism for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
