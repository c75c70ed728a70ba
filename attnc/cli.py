"""The `attnc` command line: check, fmt, show and list."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from attnc import atomic
from attnc.dsl.errors import AttncError
from attnc.settings import settings


class _Usage(Exception):
    """A command-line mistake: printed as `attnc: message`, exit 2."""


def _attn_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out += sorted(path.rglob("*.attn"))
        elif p != "-" and not path.exists():
            raise AttncError(f"no such file or directory: '{p}'")
        else:
            out.append(path)
    return out


# ---------------------------------------------------------------- commands


def cmd_check(args) -> int:
    from attnc.dsl.check import load

    failed = False
    for path in _attn_files(args.files):
        try:
            load(path)
        except AttncError as e:
            print(e.render(), file=sys.stderr)
            failed = True
    return 1 if failed else 0


def cmd_fmt(args) -> int:
    from attnc.dsl.format import format_module
    from attnc.dsl.parser import parse

    status = 0
    for path in _attn_files(args.files):
        if str(path) == "-":
            text, name = sys.stdin.read(), "<stdin>"
        else:
            try:
                text, name = path.read_text(), str(path)
            except (OSError, UnicodeDecodeError) as e:
                print(f"attnc: cannot read '{path}': {e}", file=sys.stderr)
                status = 1
                continue
        try:
            out = format_module(parse(text, name))
        except AttncError as e:
            print(e.render(), file=sys.stderr)
            status = 1
            continue
        if name == "<stdin>":
            sys.stdout.write(out)
        elif out != text:
            if args.check:
                print(f"would reformat {path}", file=sys.stderr)
                if args.diff:
                    sys.stderr.writelines(difflib.unified_diff(
                        text.splitlines(True), out.splitlines(True), str(path), str(path)))
                status = 1
            else:
                atomic.write_text(path, out)
                print(f"reformatted {path}", file=sys.stderr)
    return status


def _parse_args(pairs: list[str]) -> dict:
    from attnc.dsl.parser import parse_expr

    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise _Usage(f"--arg takes NAME=VALUE, not '{pair}'")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise _Usage(f"--arg: '{key}' is not a parameter name")
        out[key] = parse_expr(value.strip(), f"--arg {key}")
    return out


def _target(args):
    from attnc.dsl.check import load, loads

    if args.file is not None:
        prog = load(args.file)
    else:
        prog = loads("", "<library>")
    if args.plan is not None:
        if args.pattern is not None:
            raise _Usage("give --pattern or --plan, not both")
        return prog.plan(args.plan)
    if args.pattern is None:
        names = ", ".join(sorted(prog.local_patterns or prog.patterns))
        raise _Usage(f"name the pattern to show with --pattern (one of: {names})")
    return prog.pattern(args.pattern)


def _quoted(path: Path) -> str:
    return '"' + str(path) + '"'


def cmd_show(args) -> int:
    from attnc import show
    from attnc.dsl.check import PlanInfo

    target = _target(args)
    kwargs = _parse_args(args.arg or [])
    if isinstance(target, PlanInfo) and kwargs:
        raise _Usage("--arg applies to --pattern; a plan's arguments are in the plan")
    if kwargs:
        # Type-check the arguments the way a call in a file would be checked.
        from attnc.dsl.check import loads
        from attnc.dsl.format import format_expr

        call = ", ".join(f"{k} = {format_expr(v)}" for k, v in kwargs.items())
        src = f"pattern __show__ {{ mask {target.name}({call}) }}"
        if target.module.file != "<library>":
            src = f"import {_quoted(Path(target.module.file).resolve())}\n" + src
        loads(src, "--arg")
    pic = show.picture(
        target, n=args.n, head=args.head, layer=args.layer, q_len=args.q_len, args=kwargs,
        rows=args.rows or (256 if args.output else 32),
        cols=args.width or (256 if args.output else 64), seed=args.seed,
    )
    if args.output:
        show.save_png(pic, args.output)
    else:
        print(show.ascii_art(pic))
    print(show.summary(pic))
    return 0


def cmd_list(args) -> int:
    from attnc.dsl.check import load, loads

    prog = load(args.file) if args.file else loads("", "<library>")
    pats = prog.local_patterns if args.file else prog.patterns
    for name in sorted(pats):
        p = pats[name]
        params = []
        for prm in p.params:
            s = f"{prm.name}: {prm.type}"
            if prm.lo is not None or prm.hi is not None:
                s += f" in {prm.range_text()}"
            if prm.default is not None:
                from attnc.dsl.format import format_expr

                s += f" = {format_expr(prm.default)}"
            params.append(s)
        kind = "dynamic" if p.dynamic else "static"
        print(f"{name}({', '.join(params)})  [{kind}{', bias' if p.has_bias else ''}]")
    for name in sorted(prog.plans if args.file else {}):
        pl = prog.plans[name]
        print(f"plan {name}: {pl.layers} layers x {pl.heads} heads ({pl.kv_heads} KV heads)")
    return 0


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="attnc",
        description="attnc: a compiler for attention patterns written in .attn files.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="parse and check .attn files (silent when fine)")
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files or directories")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("fmt", help="format .attn files canonically (in place)")
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files, directories, or -")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a file is not formatted")
    p.add_argument("--diff", action="store_true", help="with --check, print the changes")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser("show", help="draw a pattern's mask and print its density")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help=".attn file (default: the shipped library)")
    p.add_argument("--pattern", help="pattern to show")
    p.add_argument("--plan", help="plan to show (with --layer and --head)")
    p.add_argument("--n", type=int, default=4096, help="key length n (default 4096)")
    p.add_argument("--q-len", type=int, default=None,
                   help="number of queries, the last of the n positions (default n)")
    p.add_argument("--head", type=int, default=0, help="query head (default 0)")
    p.add_argument("--layer", type=int, default=0, help="layer of a plan (default 0)")
    p.add_argument("--arg", action="append", metavar="NAME=VALUE",
                   help="pattern argument; VALUE is an expression that may use n and h")
    p.add_argument("--width", type=int, default=None,
                   help="columns of the picture (default 64, or 256 for a PNG)")
    p.add_argument("--rows", type=int, default=None,
                   help="rows of the picture (default 32, or 256 for a PNG)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic scores used to show dynamic patterns")
    p.add_argument("-o", "--output", help="write a PNG picture here instead of ASCII art")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("list", help="list the patterns of a file (default: the library)")
    p.add_argument("file", nargs="?", metavar="FILE")
    p.set_defaults(func=cmd_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    debug = settings().debug
    try:
        return args.func(args)
    except AttncError as e:
        if debug:
            raise
        print(e.render(), file=sys.stderr)
        return 1
    except _Usage as e:
        print(f"attnc: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        print(f"attnc: internal error: {type(e).__name__}: {e} (set ATTNC_DEBUG=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
