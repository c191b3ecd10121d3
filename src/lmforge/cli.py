"""`lmforge <verb>`: a thin shell over typed functions (jsonargparse builds each verb's flags from
its signature and dataclasses). Only the requested verb's module is imported. A user mistake prints
one line and exits 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from lmforge.config import closest
from lmforge.errors import LmforgeError

# verb -> "module:function"; the function's docstring is the verb's help.
VERBS: dict[str, str] = {
    "quickstart": "lmforge.recipes.quickstart:quickstart",
    "clean": "lmforge.text.clean:clean",
    "tokenizer": "lmforge.text.tokenizer:train",
    "prepare": "lmforge.data.prepare:prepare",
    "pretrain": "lmforge.recipes.pretrain:pretrain",
    "generate": "lmforge.recipes.generate:generate",
    "import": "lmforge.recipes.hub:import_",
    "export": "lmforge.recipes.hub:export",
}


def _resolve(verb: str):
    module, func = VERBS[verb].split(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: lmforge <verb> [--help] [options]", "", "verbs:"]
    for verb in VERBS:
        lines.append(f"  {verb:<12} see `lmforge {verb} --help`")
    return "\n".join(lines)


def _one_line(err: Exception) -> str:
    """Condense jsonargparse's multi-line parse errors to one line, with a did-you-mean hint."""
    text = str(err).strip()
    m = re.search(r"[Uu]nrecognized arguments: (\S+)", text)
    if m:
        return f"unknown option {m.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines[:3])


def _expand_presets(args: list[str]) -> list[str]:
    """`--preset NAME` (a shipped preset or a YAML path) becomes `--config PATH` in place, so that
    flags after it override the preset's values."""
    from lmforge.config import preset_path

    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--preset" or a.startswith("--preset="):
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            if not value:
                raise LmforgeError("--preset needs a name or a YAML path")
            out += ["--config", str(preset_path(value))]
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return out


def run_verb(verb: str, args: list[str]) -> object:
    """Parse `args` for `verb` and call its function (raises on error; used by tests and main)."""
    from jsonargparse import CLI

    if verb not in VERBS:
        raise LmforgeError(f"unknown verb '{verb}'{closest(verb, VERBS)}; verbs: {', '.join(VERBS)}")
    func = _resolve(verb)
    args = _expand_presets(args)
    try:
        return CLI(func, args=args, exit_on_error=False, prog=f"lmforge {verb}", as_positional=True)
    except argparse.ArgumentError as e:
        msg = _one_line(e)
        m = re.match(r"unknown option --([\w.]+)", msg)
        if m:
            from jsonargparse import capture_parser

            parser = capture_parser(lambda: CLI(func, args=[], prog=f"lmforge {verb}"))
            keys = [a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config")]
            msg += closest(m.group(1), keys)
        raise LmforgeError(msg) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(__version__)
        return 0
    try:
        run_verb(argv[0], argv[1:])
    except LmforgeError as e:
        print(f"lmforge {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
