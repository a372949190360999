"""``lorafx inspect``: what a spec does to a model, site by site, before you train anything.

Every linear call site with its IR form, shape, the rule that matched it, variant, effective rank,
trainable parameters, added FLOPs per token and bytes, mergeable/fusable, and the region it is traced
in; totals against the base model. ``--graph`` prints a region's rewritten fx code, ``--svg`` draws it.
The numbers come from :func:`lorafx.report.build_report`, which runs ``apply``'s own planning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafx.cli import sources
from lorafx.cli.ui import add_command
from lorafx.errors import LorafxError

EXAMPLES = """examples:
  lorafx inspect demo:tiny-llama --variant lora --r 8 --targets q_proj,v_proj
  lorafx inspect demo:tiny-llama --targets q_proj,up_proj --graph model.layers.0.mlp
  lorafx inspect demo:minilm --r 4 --targets query,value --format json
  lorafx inspect demo:mlp --svg mlp-lora.svg
  lorafx inspect lorafx.cli.models:tiny_mlp --r 2 --exclude head
"""


def register(sub: argparse._SubParsersAction) -> None:
    help = "show which linear sites a spec adapts, with parameters, FLOPs and the rewritten graph"
    p = add_command(sub, "inspect", help, __doc__, EXAMPLES)
    p.add_argument("model", metavar="MODEL", help=sources.MODEL_HELP + ", or an exported .onnx file")
    sources.add_spec_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    out.add_argument("--matched-only", action="store_true", help="list only the sites the spec adapts")
    out.add_argument(
        "--graph", metavar="SITE|REGION", help="print the rewritten fx code of a region (or of the region holding SITE)"
    )
    out.add_argument(
        "--svg", metavar="FILE", help="draw the rewritten region (--graph, default: the first) as SVG with Graphviz"
    )
    out.add_argument("--dot", metavar="FILE", help="write the Graphviz DOT text of that region (needs no renderer)")
    p.add_argument("--seed", type=int, default=0, help="seed for models built with random weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if sources.is_onnx(args.model):
        return _run_onnx(args)
    from lorafx.cli.ui import status
    from lorafx.report import build_report

    with status(f"loading {args.model}"):
        model = sources.load_model(args.model, args.seed)
    spec = sources.spec_from_args(args, model)
    with status("planning regions and building adapters"):
        report = build_report(model, spec)
    if args.graph is not None or args.svg or args.dot:
        return _graph(report, args)
    if args.format == "json":
        print(json.dumps({"source": args.model, **report.to_dict()}, indent=2))
        return 0
    from lorafx.cli.ui import console

    print_report(report, console(), source=args.model, matched_only=args.matched_only)
    return 0


# Arguments that describe an adaptation; an exported .onnx file has its adapters already.
_NOT_FOR_ONNX = (
    "spec",
    "peft",
    "variant",
    "r",
    "alpha",
    "dropout",
    "set",
    "targets",
    "targets_regex",
    "exclude",
    "graph",
    "svg",
    "dot",
)


def _run_onnx(args: argparse.Namespace) -> int:
    from lorafx.cli.onnx_info import onnx_summary, print_onnx

    used = [f"--{k.replace('_', '-')}" for k in _NOT_FOR_ONNX if getattr(args, k)]
    if used:
        raise sources.SourceError(
            f"{args.model}: an .onnx file is inspected as exported; {', '.join(used)} do not apply"
        )
    summary = onnx_summary(Path(args.model))
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        from lorafx.cli.ui import console

        print_onnx(summary, console())
    return 0


def _graph(report, args: argparse.Namespace) -> int:
    name = args.graph if args.graph is not None else (report.regions[0].fqn if report.regions else "")
    try:
        region, gm = report.find_graph(name)
    except KeyError:
        names = [r.fqn or "model" for r in report.regions]
        raise LorafxError(
            f"--graph {name!r}: no rewritten region or matched site of that name; regions: {', '.join(names)}"
        ) from None
    row = next(r for r in report.regions if r.fqn == region)
    title = f"region {region or 'model'} ({row.module_type}): {len(row.sites)} adapted site(s)"
    if args.svg or args.dot:
        from lorafx.cli.render import region_dot, render_svg

        dot = region_dot(gm, title)
        if args.dot:
            _write(Path(args.dot), dot)
            print(f"wrote {args.dot} ({title})")
        if args.svg:
            render_svg(dot, Path(args.svg))
            print(f"wrote {args.svg} ({title}; adapter subgraphs in orange)")
    if args.graph is not None and not (args.svg or args.dot):
        print(f"# {title}")
        print(gm.code.strip())
    return 0


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise LorafxError(f"{path}: cannot write ({e.strerror})") from None


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _yes(flag: bool | None) -> str:
    return "" if flag is None else "yes" if flag else "[red]no[/]"


_COLUMNS = (
    ("site", "left"),
    ("form", "left"),
    ("shape", "right"),
    ("matched by", "left"),
    ("variant", "left"),
    ("R", "right"),
    ("params", "right"),
    ("FLOPs/token", "right"),
    ("bytes", "right"),
    ("merge", "center"),
    ("fuse", "center"),
    ("region", "left"),
)
# Left out first when the table is wider than the terminal (site, variant and R always stay): all
# twelve need ~150 columns on the tiny Llama; without these seven a row fits 100 (--format json has all).
_DROP_ORDER = ("form", "fuse", "region", "bytes", "FLOPs/token", "matched by", "shape", "merge", "params")


def _rows(report, matched_only: bool) -> list[tuple[list[str], str | None]]:
    """(cells, style) per table row, in _COLUMNS order, as rich markup."""
    from rich.markup import escape

    rows = []
    for s in report.sites:
        shape = f"{s.in_features}→{s.out_features}"
        if not s.matched:
            if not matched_only:
                rows.append(([escape(s.fqn), s.form, shape, "–", *[""] * 8], "dim"))
            continue
        rule = s.rule + (f", override {s.override}" if s.override else "")
        region = "(own region)" if s.region == s.fqn else (s.region or "(whole model)")
        numbers = [str(s.rank), f"{s.params:,}", f"{s.flops_per_token:,}", _bytes(s.bytes)]
        cells = [escape(s.fqn), s.form, shape, escape(rule), s.variant, *numbers]
        rows.append(([*cells, _yes(s.mergeable), _yes(s.fusable), escape(region)], None))
    for sh in report.shared:
        cells = [f"lorafx_shared.{sh.key}", "shared", *[""] * 4, f"{sh.params:,}", "", _bytes(sh.bytes), "", "", ""]
        rows.append((cells, "italic"))
    return rows


def _total_row(report) -> list[str]:
    t = report.totals()
    numbers = [f"{t['trainable_params']:,}", f"{t['flops_per_token']:,}", _bytes(t["bytes"])]
    return [
        "total",
        "",
        "",
        f"{t['matched']} sites",
        "",
        "",
        *numbers,
        _yes(t["mergeable"]),
        "",
        f"{t['regions']} regions",
    ]


def fit_columns(widths: dict[str, int], width: int) -> list[str]:
    """The columns of _COLUMNS to show so the table fits ``width`` terminal columns (``widths``: the
    widest cell of each); drops them in _DROP_ORDER. rich draws one border and two padding cells per
    column plus the closing border, hence ``+ 3`` and ``+ 1``."""
    shown = [name for name, _ in _COLUMNS]
    for name in _DROP_ORDER:
        if sum(widths[c] + 3 for c in shown) + 1 <= width:
            break
        shown.remove(name)
    return shown


def _site_table(report, title: str, matched_only: bool, width: int):
    from rich.table import Table
    from rich.text import Text

    rows = _rows(report, matched_only)
    total = _total_row(report)
    names = [name for name, _ in _COLUMNS]
    cell_len = [
        max([len(name)] + [Text.from_markup(r[i]).cell_len for r, _ in rows] + [Text.from_markup(total[i]).cell_len])
        for i, name in enumerate(names)
    ]
    shown = fit_columns(dict(zip(names, cell_len, strict=True)), width)
    keep = [i for i, name in enumerate(names) if name in shown]
    table = Table(title=title, title_justify="left")
    for i in keep:
        name, justify = _COLUMNS[i]
        table.add_column(name, justify=justify, no_wrap=name in ("site", "region"))
    for cells, style in rows:
        table.add_row(*(cells[i] for i in keep), style=style)
    table.add_section()
    table.add_row(*(total[i] for i in keep), style="bold")
    return table, [n for n in names if n not in shown]


def _summary(report) -> list[str]:
    from rich.markup import escape

    t = report.totals()
    kinds = {}
    for r in report.regions:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    lines = [
        f"spec: {escape(json.dumps(report.spec.to_dict()['config']))} targets={escape(repr(report.spec.targets))}",
        f"regions: {t['regions']} ({', '.join(f'{n} {k}' for k, n in kinds.items())})",
        f"trainable parameters: {t['trainable_params']:,} = {t['params_ratio']:.3%} of the base model's {report.base_params:,}",
        f"added FLOPs per token: {t['flops_per_token']:,} = {t['flops_ratio']:.3%} of the base linears' "
        f"{report.base_flops_per_token:,} (attention scores excluded)",
        f"adapter bytes: {_bytes(t['bytes'])} = {t['bytes_ratio']:.3%} of the base weights ({_bytes(report.base_bytes)})",
    ]
    if not t["mergeable"]:
        bad = sorted({s.variant for s in report.matched if not s.mergeable})
        lines.append(
            f"[red]not mergeable[/]: {', '.join(bad)} (input-dependent gate); merged export is refused for these sites"
        )
    first = report.regions[0].fqn if report.regions else ""
    lines.append(
        f"[dim]add --graph {escape(first or 'model')} to print a rewritten region's code, --svg FILE to draw it[/]"
    )
    return lines


def print_report(report, con, source: str = "", matched_only: bool = False) -> None:
    """The ``lorafx inspect`` table and summary of a :class:`lorafx.report.Report` on a rich console,
    with as many columns as fit the console's width (the rest are named below the table)."""
    t = report.totals()
    title = f"{source + ' ' if source else ''}({report.model}): {t['matched']} of {t['sites']} sites adapted"
    table, dropped = _site_table(report, title, matched_only, con.width)
    con.print(table)
    if dropped:
        con.print(
            f"[dim]columns left out to fit {con.width} columns: {', '.join(dropped)} "
            "(--format json has every field; a wider terminal or COLUMNS=160 shows them)[/]"
        )
    for line in _summary(report):
        con.print(line)
