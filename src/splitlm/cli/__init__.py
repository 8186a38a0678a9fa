"""The `splitlm` command: thin drivers over the Python API (flags.py, run.py, serve.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from splitlm.cli.run import add_demo, add_eval, add_export, add_generate, cmd_demo, cmd_eval, cmd_export, cmd_generate, cmd_models
from splitlm.cli.serve import add_device_serve, add_partition, add_profile, add_serve, cmd_device_serve, cmd_partition, cmd_profile, cmd_serve
from splitlm.errors import SplitLMError


def _parser() -> argparse.ArgumentParser:

    ap = argparse.ArgumentParser(prog="splitlm", description="Run an LLM split between an edge device and a cloud server.")
    from splitlm import __version__

    ap.add_argument("--version", action="version", version=f"splitlm {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="splitlm's own debug logging; -vv also the libraries' (onnx exporter, grpc, ...)")
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the models splitlm can load")

    add_generate(sub)
    add_eval(sub)
    add_export(sub)
    add_serve(sub)
    add_device_serve(sub)
    add_profile(sub)
    add_partition(sub)
    add_demo(sub)
    return ap


COMMANDS = {"models": cmd_models, "generate": cmd_generate, "eval": cmd_eval, "export": cmd_export, "serve": cmd_serve,
            "profile": cmd_profile, "partition": cmd_partition, "demo": cmd_demo, "device-serve": cmd_device_serve}


FULL_INSTALL_MODULES = frozenset({"torch", "safetensors", "gguf", "onnx", "onnxscript", "triton", "transformers"})
"""What the cloud extra adds to the device install: a command that imports one of them needs the full install."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("splitlm").setLevel(logging.DEBUG)
    elif args.command in ("serve", "device-serve"):  # a server says what it serves: one line per session, moves, stats
        logging.getLogger("splitlm").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except SplitLMError as exc:
        print(f"splitlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in FULL_INSTALL_MODULES:
            raise
        print(f"splitlm {args.command}: error: this needs the full install, which brings {exc.name}: "
              "pip install 'splitlm[cloud]' (the device install runs generate --artifacts, device-serve, "
              "profile --device and profile --link-only)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
