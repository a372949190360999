"""Draw a rewritten region: Graphviz DOT text from the fx graph, SVG through Graphviz's ``dot``.

The DOT text is written here (no pydot): one node per fx node, and each site's adapter subgraph
(the ``lorafx.<key>`` call that lowers the active adapter and the ``lora_linear`` it feeds) in its
own coloured cluster, its nodes tagged ``class="lorafx_adapter"`` in the SVG. Rendering needs only
the ``dot`` program (Debian/Ubuntu: ``apt-get install graphviz``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from torch import fx

from lorafx.adapter import SiteAdapters
from lorafx.canonical import lora_linear
from lorafx.errors import LorafxError
from lorafx.passes.insert_adapters import CONTAINER

ADAPTER_FILL = "#f4a261"  # the adapter subgraph: orange on the grey base graph
ADAPTER_CLUSTER = "#fde8d7"
INSTALL_HINT = (
    "install Graphviz: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) or "
    "`conda install -c conda-forge graphviz`; or write the DOT text with --dot FILE and render it elsewhere"
)


class RendererMissing(LorafxError, RuntimeError):
    """Graphviz's ``dot`` program is not installed."""


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _target_name(target) -> str:
    return getattr(target, "__name__", None) or str(target).rsplit(".", 1)[-1]


def _site_label(gm: fx.GraphModule, node: fx.Node) -> str:
    sa = gm.get_submodule(node.target)
    if not isinstance(sa, SiteAdapters):
        return node.target
    lines = [f"{node.target}", f"site {sa.site}"]
    for name, adapter in sa.adapters.items():
        cfg = adapter.config
        rank = getattr(cfg, "r", None)
        lines.append(f"{name}: {cfg.name}" + (f" r={rank}" if rank is not None else ""))
    return "\n".join(lines)


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module" and str(node.target).startswith(CONTAINER + "."):
        return _site_label(gm, node)
    if node.op == "call_module":
        return f"{node.target}\n{type(gm.get_submodule(node.target)).__name__}"
    if node.op == "get_attr":
        try:
            shape = list(gm.get_parameter(node.target).shape)
        except AttributeError:
            shape = None
        return f"{node.target}" + (f"\n{shape}" if shape else "")
    if node.op == "call_function":
        return _target_name(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return node.name


def _adapter_groups(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Site key -> its adapter nodes (the SiteAdapters call and the lora_linear it feeds)."""
    groups = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is lora_linear:
            low = node.args[3]
            if isinstance(low, fx.Node) and low.op == "call_module":
                key = str(low.target).split(".", 1)[-1]
                groups[key] = [low, node]
    return groups


def region_dot(gm: fx.GraphModule, title: str) -> str:
    """DOT text of ``gm``'s graph with every adapter subgraph in a coloured, labelled cluster."""
    groups = _adapter_groups(gm.graph)
    in_group = {n for nodes in groups.values() for n in nodes}
    lines = [
        "digraph lorafx {",
        f"  graph [rankdir=TB, label={_q(title)}, labelloc=t, fontname=Helvetica, fontsize=12];",
        '  node [fontname=Helvetica, fontsize=10, style="rounded,filled", fillcolor="#eeeeee", shape=box];',
        '  edge [color="#666666"];',
    ]
    for node in gm.graph.nodes:
        if node in in_group:
            continue
        shape = {"placeholder": "ellipse", "output": "ellipse", "get_attr": "note"}.get(node.op, "box")
        lines.append(f"  {_q(node.name)} [label={_q(_label(gm, node))}, shape={shape}];")
    for key, nodes in groups.items():
        lines.append(f"  subgraph {_q('cluster_' + key)} {{")
        lines.append(
            f'    label={_q("adapter: " + key)}; style="rounded,filled"; fillcolor="{ADAPTER_CLUSTER}"; color="{ADAPTER_FILL}";'
        )
        for node in nodes:
            lines.append(
                f'    {_q(node.name)} [label={_q(_label(gm, node))}, fillcolor="{ADAPTER_FILL}", class="lorafx_adapter"];'
            )
        lines.append("  }")
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            lines.append(f"  {_q(src.name)} -> {_q(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_program() -> str:
    """Path of Graphviz's ``dot``; :class:`RendererMissing` with install instructions otherwise."""
    path = shutil.which("dot")
    if path is None:
        raise RendererMissing(f"--svg needs Graphviz's `dot` program, which is not on PATH: {INSTALL_HINT}")
    return path


def render_svg(dot_text: str, out: Path) -> Path:
    """Render ``dot_text`` to the SVG file ``out`` with Graphviz."""
    exe = dot_program()
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise LorafxError(f"{exe} -Tsvg took more than 120 s") from None
    if proc.returncode != 0:
        raise LorafxError(f"{exe} -Tsvg failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    try:
        out.write_text(proc.stdout)
    except OSError as e:
        raise LorafxError(f"{out}: cannot write ({e.strerror})") from None
    return out
