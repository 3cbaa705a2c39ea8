"""``vlmpress`` command line: one sub-command per module in :mod:`vlmpress.commands`.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (:class:`~vlmpress.errors.VlmpressError`) become a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import re
import sys

from vlmpress.errors import VlmpressError

# command name -> module; a registry instead of an if/elif chain
COMMANDS: dict[str, str] = {
    "compress": "vlmpress.commands.compress",
    "eval": "vlmpress.commands.evaluate",
    "report": "vlmpress.commands.report",
    "demo": "vlmpress.commands.demo",
    "train-reference": "vlmpress.commands.train_reference",
    "export-onnx": "vlmpress.commands.export_onnx",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 already; keep its one-line format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vlmpress", description="Activation-aware low-rank compression for CLIP models and LLMs.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue  # command not part of this build
            raise
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        # logging flags are accepted after the sub-command too
        cmd.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
        cmd.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
        module.add_arguments(cmd)
        cmd.add_argument(
            "--adapter", metavar="NAME", default=argparse.SUPPRESS,
            help="adapter family to use when several accept the model spec (built-in or installed plugin)",
        )
        if "--no-progress" not in cmd._option_string_actions:  # every command can run without bars
            cmd.add_argument("--no-progress", action="store_true", help="no progress bars")
        cmd.set_defaults(_run=module.run)
    return parser


@contextlib.contextmanager
def progress_bars_disabled():
    """Silence every progress bar for the duration: vlmpress's (tqdm) and its libraries'.

    tqdm reads ``TQDM_DISABLE`` only at import, so every tqdm is forced off here instead (even one
    created with an explicit ``disable=False``); Hugging Face libraries have their own switches.
    """
    import functools
    import os

    from tqdm import std

    original = std.tqdm.__init__

    @functools.wraps(original)
    def silent_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    saved_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    std.tqdm.__init__ = silent_init
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    toggles = []
    for module, off, on in (("transformers.utils.logging", "disable_progress_bar", "enable_progress_bar"),
                            ("datasets", "disable_progress_bars", "enable_progress_bars")):
        try:
            mod = importlib.import_module(module)
            getattr(mod, off)()
            toggles.append(getattr(mod, on))
        except (ImportError, AttributeError):  # pragma: no cover - optional
            pass
    try:
        yield
    finally:
        import warnings

        std.tqdm.__init__ = original
        if saved_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = saved_env
        with warnings.catch_warnings():  # the hub warns when its env switch still says "off"
            warnings.simplefilter("ignore")
            for on in toggles:
                on()


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _one_line(err: BaseException) -> str:
    """An error message on one line (multi-line library messages joined).

    An error re-raised from a data loader worker carries the worker's whole traceback in its
    message; only its last line (the original error, without the module-qualified type) is kept.
    """
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(r"^[A-Za-z_][\w.]*(Error|Exception|Warning): ", "", last)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    bars = progress_bars_disabled() if getattr(args, "no_progress", False) else contextlib.nullcontext()
    try:
        from vlmpress.adapters import use_adapter

        with bars, use_adapter(getattr(args, "adapter", None)):
            return int(args._run(args) or 0)
    except VlmpressError as err:
        print(f"vlmpress {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable/unwritable user paths, full disks: the environment, not a bug
        logging.getLogger(__name__).debug("OS error", exc_info=True)
        where = f" ({err.filename})" if getattr(err, "filename", None) and str(err.filename) not in str(err) else ""
        print(f"vlmpress {args.command}: error: {_one_line(err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
