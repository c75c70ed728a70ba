"""The `attnc` command line: check, fmt, show and list."""

from __future__ import annotations

import argparse
import difflib
import re
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
    from attnc.dsl.check import load, loads

    failed = False
    for p in args.files:
        # A missing path is one problem among the others: the files that exist are still
        # checked and their problems reported.
        try:
            paths = _attn_files([p])
        except AttncError as e:
            print(e.render(), file=sys.stderr)
            failed = True
            continue
        for path in paths:
            try:
                if str(path) == "-":  # as fmt: the source from stdin
                    loads(sys.stdin.read(), "<stdin>")
                else:
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
            # --diff alone is a check too (as in black and ruff): it must not rewrite the file
            # it was asked to show the changes of.
            if args.check or args.diff:
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
    if not isinstance(target, PlanInfo):
        _check_args_call(target, kwargs)
    rows = args.rows or (256 if args.output else 32)
    cols = args.width or (256 if args.output else 64)
    pic = show.picture(
        target, n=args.n, head=args.head, layer=args.layer, q_len=args.q_len, args=kwargs,
        rows=rows, cols=cols, seed=args.seed,
    )
    blocks = None
    if not args.no_blocks:
        if args.block_m < 1 or args.block_n < 1:
            raise _Usage("--block-m and --block-n must be positive")
        blocks = show.block_picture(target, n=args.n, head=args.head, layer=args.layer,
                                    q_len=args.q_len, args=kwargs, rows=rows, cols=cols,
                                    block_m=args.block_m, block_n=args.block_n)
    if args.output:
        show.save_png(pic, args.output, blocks)
    elif blocks is not None:
        print(show.side_by_side(show.block_ascii(blocks), show.ascii_art(pic).splitlines()))
    else:
        print(show.ascii_art(pic))
    if blocks is not None:
        print(show.block_summary(blocks))
    elif not args.no_blocks:
        print("blocks: chosen at run time from the scores (dynamic pattern); shown: the element "
              "mask for synthetic scores")
    print(show.summary(pic))
    return 0


def _check_args_call(target, kwargs: dict) -> None:
    """Type-check --arg values the way a call in a file would be checked."""
    if not kwargs:
        return
    from attnc.dsl.check import loads
    from attnc.dsl.format import format_expr

    call = ", ".join(f"{k} = {format_expr(v)}" for k, v in kwargs.items())
    src = f"pattern __cli__ {{ mask {target.name}({call}) }}"
    if target.module.file != "<library>":
        src = f"import {_quoted(Path(target.module.file).resolve())}\n" + src
    loads(src, "--arg")


def cmd_compile(args) -> int:
    from attnc.compiler.blockmask import Schedule
    from attnc.compiler.stages import accounting, compile_pattern, dump
    from attnc.dsl.check import PlanInfo

    target = _target(args)
    out = _output_options(args)  # checked first: a bad --arch fails before any work
    if isinstance(target, PlanInfo):
        if out is None:
            raise _Usage("compile --plan writes kernels: give -o DIR")
        if args.arg:
            raise _Usage("--arg applies to --pattern; a plan's arguments are in the plan")
    kwargs = _parse_args(args.arg or [])
    if not isinstance(target, PlanInfo):
        _check_args_call(target, kwargs)
    if args.n < 1:
        raise _Usage(f"--n must be at least 1, not {args.n}")
    if args.heads < 1:
        raise _Usage(f"--heads must be at least 1, not {args.heads}")
    if args.rows_shown < 0:
        # A negative count would print "(QB + 1 more query blocks)" for QB blocks.
        raise _Usage(f"--rows-shown must be >= 0, not {args.rows_shown}")
    q_len = args.q_len if args.q_len is not None else args.n
    if not 1 <= q_len <= args.n:
        raise _Usage(f"--q-len must be between 1 and n = {args.n}")
    if args.verify and args.emit != "stats":  # it would be ignored silently
        raise _Usage("--verify applies to --emit stats")
    try:
        sched = Schedule(args.block_m, args.block_n)
    except ValueError as e:
        raise _Usage(str(e)) from None
    if out is not None:
        for name, b in sched.odd_tiles():  # the block mask alone (no -o) takes any size
            raise _Usage(f"--{name.replace('_', '-')} {b}: kernels (-o) need a power of two")
    if isinstance(target, PlanInfo):
        from attnc.codegen import artifact

        specs = artifact.plan_specs(target, n=args.n, q_len=q_len, schedule=sched)
        return _write_output(args, out, specs, {"plan": target.name, "heads": target.heads,
                                                "layers": target.layers})
    _check_elastic(target, kwargs, args.n, args.heads, q_len)
    c = compile_pattern(target, kwargs, n=args.n, heads=args.heads, q_len=q_len,
                        schedule=sched, layout=args.layout)
    if args.dump_ir:
        for p in dump(c, args.dump_ir):
            print(f"wrote {p}", file=sys.stderr)
    if out is not None:
        from attnc.codegen import artifact
        from attnc.dsl.format import format_expr

        spec = artifact.KernelSpec(target.name, c.blockmask)
        _write_output(args, out, [spec], {
            "pattern": target.name, "args": {k: format_expr(v) for k, v in kwargs.items()},
            "heads": args.heads})
    emit = args.emit or ("blockmask" if out is None else None)
    if emit == "ir":
        print(c.texts["simplify"].split("\n# rule table:")[0])
    elif emit == "blockmask":
        print(c.texts["layout"])
        print(c.texts["blockmask"])
    elif emit == "csr":
        csr = c.blockmask.materialize()
        _print_csr(csr, args.rows_shown)
    elif emit == "stats":
        print(accounting(c, out["head_dims"][0] if out else _head_dims(args)[0],
                         verify=args.verify))
    return 0


def _head_dims(args) -> list[int]:
    from attnc.codegen.artifact import parse_head_dims

    return parse_head_dims(args.head_dim)


def _output_options(args) -> dict | None:
    """-o DIR with its --arch, --dtype and --head-dim lists (errors are one line, exit 1)."""
    from attnc.codegen import artifact

    if args.output is None:
        for flag, value in (("--arch", args.arch), ("--dtype", args.dtype)):
            if value is not None:
                raise _Usage(f"{flag} applies to kernels written with -o DIR")
        return None
    return {"archs": artifact.parse_archs(args.arch),
            "dtypes": artifact.parse_dtypes("bf16" if args.dtype is None else args.dtype),
            "head_dims": _head_dims(args)}


def _write_output(args, out: dict, specs, about: dict) -> int:
    from attnc.codegen import artifact

    about = {"file": args.file or "<library>", **about, "n": args.n, "q_len": args.q_len or args.n}
    m = artifact.write_output(args.output, specs, about=about,
                              log=lambda line: print(line, file=sys.stderr), **out)
    nbin = sum(len(k["binaries"]) for k in m["kernels"])
    print(f"wrote {Path(args.output) / 'manifest.json'}: {len(m['kernels'])} kernel(s), "
          f"{nbin} binar{'y' if nbin == 1 else 'ies'}")
    return 0


def cmd_cache(args) -> int:
    from attnc.codegen import cache

    if args.action == "ls":
        found = cache.entries()
        print(f"# {cache.root()}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}")
        for path in found:
            print(cache.describe(path))
    elif args.action == "verify":
        found = cache.entries()
        bad = cache.verify(repair=args.repair)
        for path, problems in bad:
            what = "removed" if args.repair else "damaged"
            print(f"{path.name[:16]}: {what}: {'; '.join(problems)}")
        print(f"{len(found) - len(bad)} of {len(found)} entries good")
        return 1 if bad and not args.repair else 0
    elif args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.root()}")
    elif args.action == "export":
        print(f"exported {cache.export(args.archive)} entries to {args.archive}")
    elif args.action == "import":
        installed, present = cache.import_(args.archive)
        print(f"imported {installed} entries ({present} already present)")
    return 0


def _check_elastic(target, kwargs, n: int, heads: int, q_len: int) -> None:
    """Evaluate elastic arguments once (range checks, requirements) on a tiny query slice."""
    from attnc import reference

    if target.dynamic:
        return
    reference.evaluate(target, n=n, heads=min(heads, 64), q_len=1, args=kwargs)


def _print_csr(csr, rows: int) -> None:
    H, QB = csr.kv_num_blocks.shape
    print(f"# FlexAttention BlockMask layout: {H} heads x {QB} query blocks, "
          f"BLOCK_SIZE = ({csr.block_m}, {csr.block_n}), kv blocks {csr.num_kv_blocks}")
    print(f"# partial blocks {int(csr.kv_num_blocks.sum())}, full blocks "
          f"{int(csr.full_kv_num_blocks.sum())}")
    for h in range(H):
        for qb in range(min(QB, rows)):
            part = csr.kv_indices[h, qb, : csr.kv_num_blocks[h, qb]].tolist()
            full = csr.full_kv_indices[h, qb, : csr.full_kv_num_blocks[h, qb]].tolist()
            print(f"h{h} qb{qb}: partial {_compact(part)} full {_compact(full)}")
        if QB > rows:
            print(f"h{h} ... ({QB - rows} more query blocks; --rows-shown to see more)")


def _compact(xs: list[int]) -> str:
    from attnc.compiler.blockmask import ranges_text

    return "[" + ranges_text(xs) + "]"


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


def _target_args(p: argparse.ArgumentParser, verb: str, plan_help: str) -> None:
    """What to work on: a file (or the library), a pattern or plan, its arguments, the size."""
    p.add_argument("file", nargs="?", metavar="FILE",
                   help=".attn file (default: the shipped library)")
    p.add_argument("--pattern", help=f"pattern to {verb}")
    p.add_argument("--plan", help=plan_help)
    p.add_argument("--arg", action="append", metavar="NAME=VALUE",
                   help="pattern argument; VALUE is an expression that may use n and h")
    p.add_argument("--n", type=int, default=4096, help="key length n (default 4096)")
    p.add_argument("--q-len", type=int, default=None,
                   help="number of queries, the last of the n positions (default n)")


def _block_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-m", type=int, default=128, help="query block (default 128)")
    p.add_argument("--block-n", type=int, default=128, help="key block (default 128)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="attnc",
        description="attnc: a compiler for attention patterns written in .attn files.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="parse and check .attn files (silent when fine)")
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files, directories, or -")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("fmt", help="format .attn files canonically (in place)")
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files, directories, or -")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a file is not formatted")
    p.add_argument("--diff", action="store_true",
                   help="print the changes; implies --check (changes nothing, exit 1)")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser("show", help="draw a pattern's mask and print its density")
    _target_args(p, "show", "plan to show (with --layer and --head)")
    p.add_argument("--head", type=int, default=0, help="query head (default 0)")
    p.add_argument("--layer", type=int, default=0, help="layer of a plan (default 0)")
    p.add_argument("--width", type=int, default=None,
                   help="columns of the picture (default 64, or 256 for a PNG)")
    p.add_argument("--rows", type=int, default=None,
                   help="rows of the picture (default 32, or 256 for a PNG)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic scores used to show dynamic patterns")
    p.add_argument("-o", "--output", help="write a PNG picture here instead of ASCII art")
    _block_args(p)
    p.add_argument("--no-blocks", action="store_true", help="only the element mask")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("compile", help="compile a pattern: IR, block mask, CSR, accounting, "
                       "kernels")
    _target_args(p, "compile", "plan to compile to kernels (one per distinct layer; needs -o)")
    p.add_argument("--emit", choices=["ir", "blockmask", "csr", "stats"], default=None,
                   help="what to print (default blockmask, nothing with -o)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="write the kernel source, manifest.json and binaries to DIR")
    p.add_argument("--arch", help="with -o: GPU architectures to build binaries for "
                   "(comma list, e.g. sm_80,sm_90; no GPU needed)")
    p.add_argument("--dtype", help="with -o: bf16, fp16, fp32 (comma list; default bf16)")
    p.add_argument("--heads", type=int, default=1, help="query heads (default 1)")
    _block_args(p)
    p.add_argument("--layout", choices=["auto", "none"], default="auto",
                   help="permute tokens when that saves blocks (default auto)")
    p.add_argument("--head-dim", default="128",
                   help="head dims of the binaries (comma list) and of FLOP counts (default 128)")
    p.add_argument("--rows-shown", type=int, default=8, help="query blocks shown by --emit csr")
    p.add_argument("--dump-ir", metavar="DIR", help="also write every stage to DIR")
    p.add_argument("--verify", action="store_true",
                   help="with --emit stats: count partial blocks that are really full or empty")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("cache", help="the compiled-kernel cache (ATTNC_CACHE_DIR): ls, verify, "
                       "clear, export, import")
    csub = p.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    csub.add_parser("ls", help="list the entries")
    cp = csub.add_parser("verify", help="check every entry's files against its manifest")
    cp.add_argument("--repair", action="store_true", help="remove damaged entries")
    csub.add_parser("clear", help="delete entries, generated sources and Triton's binaries")
    for action in ("export", "import"):
        cp = csub.add_parser(action, help=f"{action} entries as a .tar.gz")
        cp.add_argument("archive", metavar="FILE")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("list", help="list the patterns of a file (default: the library)")
    p.add_argument("file", nargs="?", metavar="FILE")
    p.set_defaults(func=cmd_list)

    from attnc.cli_tune import register as register_tune

    register_tune(sub)
    return ap


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--opt -1%` as `--opt=-1%`: argparse reads a value that starts with '-' and is not a
    plain number as the next option and reports "expected one argument", which hides the
    real problem (a negative budget) from the user."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if (a.startswith("--") and "=" not in a and a != "--" and i + 1 < len(argv)
                and re.match(r"-[\d.]", argv[i + 1])):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
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
    except OSError as e:  # a file or folder that cannot be read or written (-o, archives)
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"attnc: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        print(f"attnc: internal error: {type(e).__name__}: {e} (set ATTNC_DEBUG=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
