"""The ``sparsecode`` command line.

Each subcommand lives beside the code it drives: the module named in ``COMMANDS`` exposes
``configure_parser(parser)`` and ``run_cli(args) -> int``. Modules are imported only when
their subcommand runs, so ``sparsecode --help`` never imports PyTorch.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("sparsecode.demo", "run the whole path on the built-in default and show the results"),
    "report": ("sparsecode.report", "write a static HTML feature browser for a dictionary or an SAE on a store"),
    "extract": ("sparsecode.extract", "extract a transformer layer's activations to shards (resumable)"),
    "train": ("sparsecode.sae_train", "train a sparse autoencoder on an activation store and save it (SAELens layout)"),
    "encode": ("sparsecode.sae", "encode an activation store with a saved SAE or a solver on a dictionary"),
    "learn": ("sparsecode.dictionary", "learn a dictionary (online BCD/MOD/K-SVD) on an activation store or a .npy"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsecode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            import_module(module).configure_parser(p)
        except ImportError as exc:  # optional dependency missing: say so when it is run
            p.set_defaults(_import_error=str(exc))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if getattr(args, "_import_error", None):
        print(f"sparsecode {args.command}: {args._import_error}", file=sys.stderr)
        return 2
    return int(import_module(args._module).run_cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
