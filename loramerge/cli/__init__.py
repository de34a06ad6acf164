"""Command line: parse, call one library function, print. Each command lives in its own module
(apply, verify, algebra: combine/unmerge, onnx: export-onnx, inspect); the options they share are in
options.py and the one place user errors become `Error: ...` lines is errors.py. Library modules
are imported inside the commands, so `loramerge --help` stays fast."""

from __future__ import annotations

import click

from .algebra import combine_cmd, unmerge_cmd
from .apply import apply_cmd
from .errors import Group
from .inspect import inspect_cmd
from .onnx import export_onnx_cmd
from .verify import verify_cmd


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loramerge")
def main():
    """Fold LoRA adapters into base model weights: streaming, exact, in bounded memory."""


for _command in (apply_cmd, verify_cmd, unmerge_cmd, combine_cmd, export_onnx_cmd, inspect_cmd):
    main.add_command(_command)

if __name__ == "__main__":
    main()
