"""The ``secateur`` command line. Subcommands live in small functions registered in ``COMMANDS``.

Exit codes: 0 success, 1 a PruningError (bad input; message without traceback unless --debug),
2 usage error (argparse), 3 unexpected internal error."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from secateur.errors import PruningError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit code`` as subcommand ``name``."""
    def deco(fn):
        COMMANDS[name] = (add_args, fn)
        return fn
    return deco


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=1, help="training epochs (and fine-tuning epochs)")
    p.add_argument("--ratio", type=float, default=0.6, help="per-layer magnitude pruning ratio")
    p.add_argument("--global-ratio", type=float, default=0.9, help="global pruning ratio of the last step")
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--out", default="secateur-out", help="output folder (table JSON, histograms)")
    p.add_argument("--seed", type=int, default=0)


@command("demo", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from secateur.demo import run_demo
    run_demo(epochs=args.epochs, ratio=args.ratio, global_ratio=args.global_ratio, data=args.data,
             out_dir=args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateur", description="Prune PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PruningError as e:
        if args.debug:
            raise
        print(f"secateur: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - last-resort message for scripts
        if args.debug:
            raise
        print(f"secateur: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
