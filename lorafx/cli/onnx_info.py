"""``lorafx inspect MODEL.onnx``: what an exported graph expects, generically.

Lists graph inputs and outputs (name, dtype, shape), marks the inputs and initializers that carry an
adapter (their name mentions lora/lorafx/adapter, or the manifest names them), counts initializers
and ops, and shows the JSON manifest written beside the model (``<stem>*.json``, else any ``*.json``
in the same folder). Nothing here depends on how the exporter names things beyond that.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lorafx.cli.sources import SourceError

_ADAPTER_NAME = re.compile(r"lora|lorafx|adapter", re.IGNORECASE)


def _dims(type_proto) -> list:
    shape = type_proto.tensor_type.shape
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in shape.dim]


def find_manifest(path: Path) -> Path | None:
    """The JSON manifest beside ``path``: ``<stem>*.json``, else one named ``*lorafx*`` or
    ``*manifest*``, else the only ``*.json`` in the folder."""
    every = sorted(path.parent.glob("*.json"))
    for chosen in (
        [p for p in every if p.name.startswith(path.stem)],
        [p for p in every if "lorafx" in p.name.lower() or "manifest" in p.name.lower()],
        every if len(every) == 1 else [],
    ):
        if chosen:
            return chosen[0]
    return None


def onnx_summary(path: Path) -> dict[str, Any]:
    """JSON-ready description of the ONNX model at ``path`` (weights stored outside are not read)."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise SourceError(f"{path}: inspecting ONNX needs onnx (pip install 'lorafx[onnx]')") from None
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / ValueError / OSError depending on the damage
        raise SourceError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    manifest_path = find_manifest(path)
    manifest, manifest_text = None, ""
    if manifest_path is not None:
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            manifest = {"error": f"not valid JSON: {e}"}
        # A name the manifest mentions is an adapter tensor, except where it lists the model's own
        # inputs and outputs.
        described = (
            {k: v for k, v in manifest.items() if k not in ("inputs", "outputs")}
            if isinstance(manifest, dict)
            else manifest
        )
        manifest_text = json.dumps(described)
    g = model.graph
    inits = {t.name for t in g.initializer}

    def is_adapter(name: str) -> bool:
        return bool(_ADAPTER_NAME.search(name)) or (bool(manifest_text) and f'"{name}"' in manifest_text)

    def tensor(vi) -> dict[str, Any]:
        dtype = helper.tensor_dtype_to_string(vi.type.tensor_type.elem_type).replace("TensorProto.", "")
        return {"name": vi.name, "dtype": dtype, "shape": _dims(vi.type), "adapter": is_adapter(vi.name)}

    inputs = [tensor(vi) for vi in g.input if vi.name not in inits]
    init_bytes = 0
    adapter_inits = []
    for t in g.initializer:
        size = 1
        for d in t.dims:
            size *= d
        nbytes = size * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        init_bytes += nbytes
        if is_adapter(t.name):
            adapter_inits.append({"name": t.name, "shape": list(t.dims), "bytes": nbytes})
    ops = Counter(n.op_type for n in g.node)
    for f in model.functions:
        ops.update(n.op_type for n in f.node)
    return {
        "onnx": str(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": inputs,
        "outputs": [tensor(vi) for vi in g.output],
        "initializers": {"count": len(g.initializer), "bytes": init_bytes, "adapter": adapter_inits},
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": len(g.node),
        "manifest": {"path": str(manifest_path), "content": manifest} if manifest_path else None,
    }


def print_onnx(summary: dict[str, Any], console) -> None:
    """Rich rendering of :func:`onnx_summary`."""
    from rich.markup import escape
    from rich.table import Table

    console.print(
        f"[bold]{summary['onnx']}[/]  ir {summary['ir_version']}, opsets {summary['opsets']}, {summary['nodes']} nodes"
    )
    t = Table(title="graph inputs", title_justify="left")
    for col in ("name", "dtype", "shape", "kind"):
        t.add_column(col)
    for i in summary["inputs"]:
        t.add_row(
            escape(i["name"]),
            i["dtype"],
            escape(str(i["shape"])),
            "[bold orange3]adapter[/]" if i["adapter"] else "model",
        )
    console.print(t)
    n_adapter = sum(i["adapter"] for i in summary["inputs"])
    console.print(
        f"{len(summary['inputs'])} inputs, {n_adapter} adapter inputs; outputs: {', '.join(o['name'] for o in summary['outputs'])}"
    )
    init = summary["initializers"]
    console.print(
        f"initializers: {init['count']} ({init['bytes']:,} bytes), {len(init['adapter'])} adapter initializers"
    )
    for a in init["adapter"][:20]:
        console.print(f"  {a['name']} {a['shape']}", markup=False)
    console.print("ops: " + ", ".join(f"{k} {v}" for k, v in summary["ops"].items()))
    m = summary["manifest"]
    if m is None:
        console.print("manifest: none beside the model")
        return
    console.print(f"manifest: {m['path']} (full content with --format json)", markup=False)
    content = m["content"] if isinstance(m["content"], dict) else {"content": m["content"]}
    for key, value in content.items():
        text = json.dumps(value)
        if len(text) > 100:  # long lists (one entry per site) are summarised; --format json has them all
            text = f"{len(value)} entries" if isinstance(value, (list, dict)) else text[:97] + "..."
        console.print(f"  {key}: {text}", markup=False)
