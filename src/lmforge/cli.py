"""`lmforge <verb>`: a thin shell over typed functions (jsonargparse builds each verb's flags from
its signature and dataclasses). Only the requested verb's module is imported. A user mistake prints
one line and exits 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import errno
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
    "finetune": "lmforge.recipes.finetune:finetune",
    "evaluate": "lmforge.recipes.evaluate:evaluate",
    "predict": "lmforge.recipes.predict:predict",
    "ablation": "lmforge.recipes.ablation:ablation",
    "ladder": "lmforge.recipes.ladder:ladder",
    "generate": "lmforge.recipes.generate:generate",
    "import": "lmforge.recipes.hub:import_",
    "export": "lmforge.recipes.hub:export",
    "embed": "lmforge.recipes.embed:embed",
    "fill_mask": "lmforge.recipes.fill_mask:fill_mask",
    "attention": "lmforge.recipes.attention:attention",
    "serve": "lmforge.recipes.serve:serve",
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


def _param_types(func) -> dict[str, object]:
    """Flag name -> annotation for a verb's parameters, with dataclass fields as `section.field`."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(func)
    out: dict[str, object] = {}
    for name, tp in hints.items():
        if name == "return":
            continue
        out[name] = tp
        for arg in (typing.get_args(tp) or (tp,)):
            if dataclasses.is_dataclass(arg):
                for fname, ftp in typing.get_type_hints(arg).items():
                    out[f"{name}.{fname}"] = ftp
    return out


def _is_list(tp) -> bool:
    import typing

    return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))


def _is_bool(tp) -> bool:
    import typing

    return tp is bool or (bool in typing.get_args(tp) and not _is_list(tp))


def _scan_args(args: list[str], types: dict) -> tuple[list[str], list[tuple[str, str | None]], dict[str, list[str]]]:
    """Split a command line into (positionals, flags as (name, value), values of repeated list flags).
    A flag's value is None when absent, 'true' for a bare boolean flag, and '\0' marks a short option
    (`-h`) passed through as is; a list flag given as plain values (`--prompt x --prompt y`) is collected
    into `repeated[name]` and appears once in `flags`."""
    positionals: list[str] = []
    flags: list[tuple[str, str | None]] = []
    repeated: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            tp = types.get(name)
            if eq:
                i += 1
            elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                value, i = args[i + 1], i + 2
            else:
                value, i = ("true" if tp is not None and _is_bool(tp) else None), i + 1
            if tp is not None and _is_list(tp) and value is not None and not value.lstrip().startswith("["):
                if name not in repeated:
                    repeated[name] = []
                    flags.append((name, None))
                repeated[name].append(value)
            else:
                flags.append((name, value))
        elif a.startswith("-") and len(a) > 1 and not a[1:2].isdigit():
            flags.append((a, "\0"))  # -h and other short options: pass through
            i += 1
        else:
            positionals.append(a)
            i += 1
    return positionals, flags, repeated


def _normalise_args(func, args: list[str]) -> list[str]:
    """Make the shell-friendly forms work: `verb a.txt b.txt` (a list positional), `--prompt x
    --prompt y` (repeated list flags), a bare boolean flag `--compile` (= `--compile true`), and required
    parameters given as flags (`--out DIR`; jsonargparse takes them only as positionals)."""
    import inspect
    import json

    types = _param_types(func)
    params = list(inspect.signature(func).parameters.values())
    positionals, flags, repeated = _scan_args(args, types)
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # required parameters given as flags (or as repeated list flags) take their place among the positionals
    given = {name: value for name, value in flags if name in required and value != "\0"}
    given.update({name: json.dumps(repeated.pop(name)) for name in list(repeated) if name in required})
    flags = [(n, v) for n, v in flags if n not in given]
    # the first parameter, when it is a required list, takes every bare value the later required ones leave
    list_first = bool(required) and required[0] == params[0].name and _is_list(types.get(params[0].name))
    out: list[str] = []
    rest = list(positionals)
    for name in required:
        if name in given:
            out.append(given[name])
        elif list_first and name == required[0] and rest and not rest[0].lstrip().startswith("["):
            later_missing = sum(1 for n in required[1:] if n not in given)
            take = len(rest) if later_missing == 0 else max(1, len(rest) - later_missing)
            out.append(json.dumps(rest[:take]))
            rest = rest[take:]
        elif rest:  # one value (for a list: already a JSON/YAML list such as '[a.txt, b.txt]')
            out.append(rest.pop(0))
    out.extend(rest)
    for name, value in flags:
        if value == "\0":
            out.append(name)
        elif name in repeated:
            out += [f"--{name}", json.dumps(repeated[name])]
        else:
            out += [f"--{name}"] + ([value] if value is not None else [])
    return out


def run_verb(verb: str, args: list[str]) -> object:
    """Parse `args` for `verb` and call its function (raises on error; used by tests and main)."""
    from jsonargparse import CLI

    if verb not in VERBS:
        raise LmforgeError(f"unknown verb '{verb}'{closest(verb, VERBS)}; verbs: {', '.join(VERBS)}")
    func = _resolve(verb)
    args = _normalise_args(func, _expand_presets(args))
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


# the machine, not lmforge: a full disk, a quota, a read-only file system, no permission
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:  # anything else is a bug: keep its traceback
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"lmforge {argv[0]}: error: {where}{e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
