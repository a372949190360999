"""One table of bad inputs: each row must raise its error class, with a message naming what is wrong
(the key, site, file, field or variant), and must leave the model bit for bit as it was.

``PYTHONPATH=.:tests python tests/test_bad_input.py`` prints the table with the real messages as
Markdown (the README's "Bad input" table is that output).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from model_state import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file
from variant_cases import example_configs

import lorafx
from lorafx.cli.models import tiny_llama, tiny_mlp
from lorafx.errors import AdapterFileError, ExportError, NotMergeableError, SpecError

Q = "model.layers.0.self_attn.q_proj"  # a site every file below has


def llama(layers: int = 1, intermediate: int = 64):
    return tiny_llama(seed=0, hidden=32, layers=layers, intermediate=intermediate, heads=2, kv_heads=1, vocab=64)


def adapted(targets="all-linear"):
    return lorafx.apply(llama(), lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random"), targets=targets))


def _edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def lorafx_dir(tmp: Path, tensors=None, meta=None, raw=None) -> Path:
    """A saved lorafx adapter of ``adapted()``, then broken by the given edits."""
    d = lorafx.save_adapter(adapted(), tmp / "adapter")
    if tensors:
        _edit_tensors(d / "lorafx_adapter.safetensors", tensors)
    if meta:
        _edit_json(d / "lorafx_adapter.json", meta)
    if raw:
        raw(d)
    return d


def peft_dir(tmp: Path, tensors=None, config=None, raw=None) -> Path:
    """A PEFT LoRA directory written by ``lorafx.to_peft``, then broken by the given edits."""
    d = lorafx.to_peft(adapted(), tmp / "peft")
    if tensors:
        _edit_tensors(d / "adapter_model.safetensors", tensors)
    if config:
        _edit_json(d / "adapter_config.json", config)
    if raw:
        raw(d)
    return d


def truncate(name: str):
    def cut(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])

    return cut


def corrupt_header(name: str):
    def smash(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        data[8:24] = b"\xff" * 16  # the JSON header starts at byte 8
        (d / name).write_bytes(bytes(data))

    return smash


def _other_save_weights(tmp: Path, d: Path) -> None:
    """Put the tensors of another save of the same adapter beside this save's JSON."""
    other = lorafx.save_adapter(adapted(), tmp / "other")
    (d / "lorafx_adapter.safetensors").write_bytes((other / "lorafx_adapter.safetensors").read_bytes())


def _save_into_a_file(tmp: Path):
    path = tmp / "a-file"
    path.write_text("not a directory")
    m = adapted()
    return (lambda: lorafx.save_adapter(m, path)), m, {"path": str(path)}


def _poisoned(model):
    with torch.no_grad():
        lorafx.iter_sites(model)[Q].adapters["default"].lora_B[0, 0] = float("nan")
    return model


def _kv_export(model, **kw):
    from lorafx.export import to_onnx

    ids = torch.randint(0, 64, (2, 4))
    return to_onnx(model, {"input_ids": ids}, Path(tempfile.mkdtemp()) / "kv", mode="unmerged", kv_cache=True, **kw)


def _t5():
    from helpers import tiny_t5

    return lorafx.apply(tiny_t5(), lorafx.Spec(lorafx.LoRA(r=2), targets=["q", "v"]))


def _seq2seq_export(model, path, **kw):
    from lorafx.export import to_onnx

    ids = torch.randint(0, 64, (2, 4))
    return to_onnx(model, {"input_ids": ids}, path, mode="unmerged", kv_cache=True, **kw)


def pk(site: str, ab: str) -> str:
    return f"base_model.model.{site}.lora_{ab}.weight"


@dataclass
class Case:
    """``run(tmp)`` returns (the failing call, the model it must leave unchanged or None, a dict
    used to format ``needles``): strings the message must contain."""

    name: str
    run: Callable
    error: type
    needles: tuple[str, ...]


def load(make_dir, model=None, loader=None):
    def run(tmp):
        d, m = make_dir(tmp), model() if model else llama()
        return (lambda: (loader or lorafx.load_adapter)(m, d)), m, {"dir": str(d)}

    return run


def call(fn, model=None):
    def run(tmp):
        m = model() if model else None
        return (lambda: fn(m)), m, {}

    return run


def spec(**kw):
    return lambda m: lorafx.apply(m, lorafx.Spec(**{"config": lorafx.LoRA(r=4), **kw}))


DROP_A = lambda t: t.pop(f"{Q}.lora_A")  # noqa: E731
CASES = [
    # -- lorafx adapter files ------------------------------------------------------------------
    Case(
        "adapter file: missing key",
        load(lambda t: lorafx_dir(t, tensors=DROP_A)),
        AdapterFileError,
        ("missing keys", f"{Q}.lora_A", "{dir}"),
    ),
    Case(
        "adapter file: unexpected key",
        load(lambda t: lorafx_dir(t, tensors=lambda s: s.update(extra=torch.zeros(2)))),
        AdapterFileError,
        ("unexpected keys", "'extra'"),
    ),
    Case(
        "adapter file: mis-shaped key",
        load(lambda t: lorafx_dir(t, tensors=lambda s: s.update({f"{Q}.lora_A": torch.zeros(3, 32)}))),
        AdapterFileError,
        (f"{Q}.lora_A", "[3, 32]", "[4, 32]"),
    ),
    Case(
        "adapter file: wrong dtype (int32)",
        load(lambda t: lorafx_dir(t, tensors=lambda s: s.update({f"{Q}.lora_B": s[f"{Q}.lora_B"].int()}))),
        AdapterFileError,
        (f"{Q}.lora_B", "torch.int32"),
    ),
    Case(
        "adapter file: truncated safetensors",
        load(lambda t: lorafx_dir(t, raw=truncate("lorafx_adapter.safetensors"))),
        AdapterFileError,
        ("lorafx_adapter.safetensors", "cannot read"),
    ),
    Case(
        "adapter file: corrupted safetensors header",
        load(lambda t: lorafx_dir(t, raw=corrupt_header("lorafx_adapter.safetensors"))),
        AdapterFileError,
        ("lorafx_adapter.safetensors", "cannot read"),
    ),
    Case(
        "adapter file: empty safetensors",
        load(lambda t: lorafx_dir(t, raw=lambda d: (d / "lorafx_adapter.safetensors").write_bytes(b""))),
        AdapterFileError,
        ("lorafx_adapter.safetensors",),
    ),
    Case(
        "adapter file: JSON missing",
        load(lambda t: lorafx_dir(t, raw=lambda d: (d / "lorafx_adapter.json").unlink())),
        AdapterFileError,
        ("lorafx_adapter.json", "no such file"),
    ),
    Case(
        "adapter file: JSON not valid",
        load(lambda t: lorafx_dir(t, raw=lambda d: (d / "lorafx_adapter.json").write_text("{oops"))),
        AdapterFileError,
        ("lorafx_adapter.json", "not valid JSON"),
    ),
    Case(
        "adapter file: unknown format_version",
        load(lambda t: lorafx_dir(t, meta=lambda m: m.update(format_version=99))),
        AdapterFileError,
        ("lorafx_adapter.json", "format_version 99"),
    ),
    Case(
        "adapter file: spec of unknown version",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"].update(format_version=7))),
        AdapterFileError,
        ("lorafx_adapter.json", "format_version 7"),
    ),
    Case(
        "adapter file: spec of unknown variant",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"]["config"].update(variant="lorax"))),
        AdapterFileError,
        ("unknown variant 'lorax'", "lora"),
    ),
    Case(
        "adapter file: variant config of unknown version",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"]["config"].update(version=5))),
        AdapterFileError,
        ("variant 'lora'", "version 5"),
    ),
    Case(
        "adapter file: unknown config field",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"]["config"].update(rank=4))),
        AdapterFileError,
        ("unknown config field(s) ['rank']",),
    ),
    Case(
        "adapter file: base model with other shapes",
        load(lorafx_dir, model=lambda: llama(intermediate=48)),
        AdapterFileError,
        ("different base model", "model.layers.0.mlp.up_proj", "[64, 32]", "[48, 32]"),
    ),
    Case(
        "adapter file: base model with other sites",
        load(lorafx_dir, model=lambda: llama(layers=2)),
        AdapterFileError,
        ("different base model", "model.layers.1."),
    ),
    Case(
        "adapter file: directory missing", load(lambda t: t / "nowhere"), AdapterFileError, ("nowhere", "no such file")
    ),
    Case(
        "adapter file: NaN/Inf tensor",
        load(lambda t: lorafx_dir(t, tensors=lambda s: s[f"{Q}.lora_B"].fill_(float("nan")))),
        AdapterFileError,
        ("non-finite", f"{Q}.lora_B", "allow_nonfinite=True"),
    ),
    Case(
        "adapter file: JSON and tensors from two saves",
        load(lambda t: lorafx_dir(t, raw=lambda d: _other_save_weights(t, d))),
        AdapterFileError,
        ("do not belong together", "two different saves"),
    ),
    Case(
        "adapter file: JSON path is a directory",
        load(
            lambda t: lorafx_dir(
                t, raw=lambda d: ((d / "lorafx_adapter.json").unlink(), (d / "lorafx_adapter.json").mkdir())
            )
        ),
        AdapterFileError,
        ("lorafx_adapter.json", "is a directory"),
    ),
    Case(
        "adapter file: scales not finite",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["scales"].update({Q: float("nan")}))),
        AdapterFileError,
        ("'scales' must be finite numbers", Q),
    ),
    Case(
        'adapter file: rslora "false" (a string)',
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"]["config"].update(rslora="false"))),
        AdapterFileError,
        ("lorafx_adapter.json", "rslora must be true or false", "'false'"),
    ),
    Case(
        "adapter file: alpha true",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"]["config"].update(alpha=True))),
        AdapterFileError,
        ("lorafx_adapter.json", "alpha must be a finite number", "True"),
    ),
    Case(
        'adapter file: dropout "0.1" (a string)',
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"]["config"].update(dropout="0.1"))),
        AdapterFileError,
        ("lorafx_adapter.json", "dropout must be a finite number", "'0.1'"),
    ),
    Case(
        "adapter file: overrides not an object",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"].update(overrides=[1]))),
        AdapterFileError,
        ("lorafx_adapter.json", "'overrides' must be a JSON object", "[1]"),
    ),
    Case(
        "adapter file: config not an object",
        load(lambda t: lorafx_dir(t, meta=lambda m: m["spec"].update(config="lora"))),
        AdapterFileError,
        ("lorafx_adapter.json", "'config' must be a JSON object", "'lora'"),
    ),
    Case(
        "save into a path that is a file",
        _save_into_a_file,
        AdapterFileError,
        ("{path}", "exists and is not a directory"),
    ),
    # -- PEFT files -------------------------------------------------------------------------------
    Case(
        "PEFT file: missing key",
        load(lambda t: peft_dir(t, tensors=lambda s: s.pop(pk(Q, "B"))), loader=lorafx.from_peft),
        AdapterFileError,
        ("missing keys", f"{Q}.lora_B"),
    ),
    Case(
        "PEFT file: unexpected key",
        load(
            lambda t: peft_dir(t, tensors=lambda s: s.update({pk("lm_head", "A"): torch.zeros(4, 32)})),
            loader=lorafx.from_peft,
        ),
        AdapterFileError,
        ("unexpected keys", "lm_head"),
    ),
    Case(
        "PEFT file: mis-shaped key",
        load(
            lambda t: peft_dir(t, tensors=lambda s: s.update({pk(Q, "B"): torch.zeros(32, 8)})), loader=lorafx.from_peft
        ),
        AdapterFileError,
        (f"{Q}.lora_B", "[32, 8]", "[32, 4]"),
    ),
    Case(
        "PEFT file: wrong dtype (bool)",
        load(
            lambda t: peft_dir(t, tensors=lambda s: s.update({pk(Q, "A"): s[pk(Q, "A")] > 0})), loader=lorafx.from_peft
        ),
        AdapterFileError,
        (f"{Q}.lora_A", "torch.bool"),
    ),
    Case(
        "PEFT file: truncated safetensors",
        load(lambda t: peft_dir(t, raw=truncate("adapter_model.safetensors")), loader=lorafx.from_peft),
        AdapterFileError,
        ("adapter_model.safetensors", "cannot read"),
    ),
    Case(
        "PEFT file: not LoRA (peft_type IA3)",
        load(lambda t: peft_dir(t, config=lambda c: c.update(peft_type="IA3")), loader=lorafx.from_peft),
        AdapterFileError,
        ("adapter_config.json", "'IA3'"),
    ),
    Case(
        "PEFT file: DoRA",
        load(lambda t: peft_dir(t, config=lambda c: c.update(use_dora=True)), loader=lorafx.from_peft),
        AdapterFileError,
        ("adapter_config.json", "use_dora=True"),
    ),
    Case(
        "PEFT file: target_modules match nothing",
        load(lambda t: peft_dir(t, config=lambda c: c.update(target_modules=["qkv"])), loader=lorafx.from_peft),
        SpecError,
        ("['qkv']", "match no linear site"),
    ),
    Case(
        "PEFT file: weights missing",
        load(lambda t: peft_dir(t, raw=lambda d: (d / "adapter_model.safetensors").unlink()), loader=lorafx.from_peft),
        AdapterFileError,
        ("adapter_model.safetensors", "no such file"),
    ),
    # -- specs and configs ------------------------------------------------------------------------
    Case(
        "spec matches nothing",
        call(spec(targets=["qproj"]), llama),
        SpecError,
        ("['qproj']", "match no linear site", "did you mean ['q_proj'"),
    ),
    Case("one target entry matches nothing", call(spec(targets=["q_proj", "w_proj"]), llama), SpecError, ("'w_proj'",)),
    Case(
        "override pattern matches nothing",
        call(spec(targets=["q_proj"], overrides={"v_proj": {"r": 2}}), llama),
        SpecError,
        ("'v_proj' names linear sites that the targets/exclude do not select",),
    ),
    Case(
        "override with unknown field",
        call(lambda m: lorafx.Spec(lorafx.LoRA(), overrides={"q_proj": {"rank": 2}})),
        SpecError,
        ("overrides['q_proj']", "rank"),
    ),
    Case("rank 0", call(lambda m: lorafx.LoRA(r=0)), ValueError, ("r must be a positive int", "0")),
    Case("rank -1", call(lambda m: lorafx.LoRA(r=-1)), ValueError, ("r must be a positive int", "-1")),
    Case(
        "rank of wrong type (2.5)", call(lambda m: lorafx.LoRA(r=2.5)), ValueError, ("r must be a positive int", "2.5")
    ),
    Case("alpha <= 0", call(lambda m: lorafx.LoRA(alpha=0)), ValueError, ("alpha",)),
    Case("dropout 1.0", call(lambda m: lorafx.LoRA(dropout=1.0)), ValueError, ("dropout",)),
    Case(
        "unknown variant",
        call(lambda m: lorafx.Spec.from_dict({"config": {"variant": "qlora"}})),
        SpecError,
        ("unknown variant 'qlora'", "known variants"),
    ),
    Case(
        "spec of unknown version",
        call(lambda m: lorafx.Spec.from_dict({"format_version": 2, "config": {"variant": "lora"}})),
        SpecError,
        ("format_version 2",),
    ),
    Case("Spec.config of wrong type", call(lambda m: lorafx.Spec("lora")), SpecError, ("Spec.config", "'lora'")),
    Case(
        "Spec.targets of wrong type",
        call(lambda m: lorafx.Spec(lorafx.LoRA(), targets=5)),
        SpecError,
        ("Spec.targets", "5"),
    ),
    Case(
        "Spec.targets regex does not compile",
        call(lambda m: lorafx.Spec(lorafx.LoRA(), targets="q_proj(")),
        SpecError,
        ("'q_proj('", "does not compile"),
    ),
    Case(
        "apply() given a non-Spec", call(lambda m: lorafx.apply(m, {"r": 4}), llama), SpecError, ("lorafx.Spec", "dict")
    ),
    Case(
        "adapter name not an identifier",
        call(lambda m: lorafx.apply(m, lorafx.Spec(lorafx.LoRA()), name="my adapter"), llama),
        SpecError,
        ("'my adapter'",),
    ),
    Case(
        "adapter name already used",
        call(lambda m: lorafx.apply(m, lorafx.Spec(lorafx.LoRA())), adapted),
        SpecError,
        ("'default' already exists",),
    ),
    Case(
        "exclude entry matches nothing",
        call(spec(targets="all-linear", exclude=["q_prj"]), llama),
        SpecError,
        ("exclude 'q_prj' matches no linear site",),
    ),
    Case(
        "override shadowed by an earlier one",
        call(spec(targets=["q_proj"], overrides={"q_proj": {"r": 2}, r"model\.layers\.0\..*": {"r": 3}}), llama),
        SpecError,
        ("never applies", "'q_proj' comes first"),
    ),
    Case("alpha NaN", call(lambda m: lorafx.LoRA(alpha=float("nan"))), ValueError, ("alpha must be a finite number",)),
    Case("alpha True", call(lambda m: lorafx.LoRA(alpha=True)), ValueError, ("alpha must be a finite number", "True")),
    Case('rslora "false"', call(lambda m: lorafx.LoRA(rslora="false")), ValueError, ("rslora must be true or false",)),
    Case(
        "rank above min(d_in, d_out)",
        call(spec(config=lorafx.LoRA(r=40), targets=["q_proj"]), llama),
        SpecError,
        (Q, "r=40", "min(d_in, d_out) = 32"),
    ),
    Case(
        "adapter name that is a module attribute",
        call(lambda m: lorafx.apply(m, lorafx.Spec(lorafx.LoRA(r=2)), name="training"), llama),
        SpecError,
        ("'training' is an attribute of torch.nn.Module",),
    ),
    # -- state changes ----------------------------------------------------------------------------
    Case(
        "set_adapter to an unknown name",
        call(lambda m: lorafx.set_adapter(m, "other"), adapted),
        SpecError,
        ("'other'", "['default']"),
    ),
    Case(
        "merge twice",
        call(lambda m: (lorafx.merge(m), lorafx.merge(m)), adapted),
        SpecError,
        ("'default' is already merged",),
    ),
    Case(
        "merge an adapter holding NaN",
        call(lambda m: lorafx.merge(m), lambda: _poisoned(adapted())),
        NotMergeableError,
        (Q, "non-finite", "NaN/Inf in the adapter"),
    ),
    Case(
        "verify_merge on non-finite outputs",
        call(lambda m: lorafx.verify_merge(m, {"inputs_embeds": torch.full((1, 3, 32), float("inf"))}), adapted),
        NotMergeableError,
        ("verify_merge", "non-finite"),
    ),
    Case(
        "save_pretrained of an adapted model",
        call(lambda m: m.save_pretrained(tempfile.mkdtemp()), adapted),
        SpecError,
        ("save_pretrained", "save_adapter", "merge_and_unload"),
    ),
    Case("unmerge with nothing merged", call(lambda m: lorafx.unmerge(m), adapted), SpecError, ("nothing is merged",)),
    Case(
        "merge a model lorafx never adapted",
        call(lambda m: lorafx.merge(m), llama),
        SpecError,
        ("LlamaForCausalLM", "lorafx.apply"),
    ),
    # -- several adapters: per row and summed (lorafx/rows.py, lorafx/several.py) -----------------
    Case(
        "per-row adapters: batch neither the names' count nor a multiple",
        call(lambda m: _per_row_forward(m, ["default", None], batch=3), adapted),
        SpecError,
        (Q, "for 2 rows", "batch has 3 rows"),
    ),
    Case(
        "per-row adapters: unknown name",
        call(lambda m: _per_row_forward(m, ["default", "nope"], batch=2), adapted),
        SpecError,
        ("no adapter named 'nope'",),
    ),
    Case(
        "several active: unknown name",
        call(lambda m: lorafx.set_adapter(m, ["default", "nope"]), adapted),
        SpecError,
        ("no adapter named 'nope'",),
    ),
    Case(
        "several active: save_adapter without a name",
        call(lambda m: lorafx.save_adapter(m, tempfile.mkdtemp()), lambda: _two_active(adapted())),
        SpecError,
        ("['default', 'b']", "are active together", "name="),
    ),
    Case(
        "KV-cache export of a model without a cache",
        call(lambda m: _kv_export(m), lambda: lorafx.apply(tiny_mlp(), lorafx.Spec(lorafx.LoRA(r=2), targets=["up"]))),
        ExportError,
        ("kv_cache=True", "past_key_values", "TinyMLP"),
    ),
    Case(
        "KV-cache export with dynamic=False",
        call(lambda m: _kv_export(m, dynamic=False), adapted),
        ExportError,
        ("kv_cache=True", "dynamic=False"),
    ),
    Case(
        "seq2seq KV-cache export with dynamic=False",
        call(lambda m: _seq2seq_export(m, Path(tempfile.mkdtemp()) / "s", dynamic=False), _t5),
        ExportError,
        ("kv_cache=True", "encoder-decoder", "dynamic=False"),
    ),
    Case(
        "seq2seq KV-cache export to a .onnx path",
        call(lambda m: _seq2seq_export(m, Path(tempfile.mkdtemp()) / "t5.onnx"), _t5),
        ExportError,
        ("three graphs", "encoder.onnx", "give a directory"),
    ),
]


def _per_row_forward(model, names, batch):
    with torch.no_grad(), lorafx.using_adapter(model, names):
        model(torch.zeros(batch, 3, dtype=torch.long))


def _two_active(model):
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), targets=["q_proj"]), name="b")
    lorafx.set_adapter(model, ["default", "b"])
    return model


if "mor" in example_configs():
    CASES.append(
        Case(
            "merge a non-mergeable variant (MoR)",
            call(
                lorafx.merge, lambda: lorafx.apply(llama(), lorafx.Spec(example_configs()["mor"], targets=["q_proj"]))
            ),
            NotMergeableError,
            (Q, "'mor'"),
        ),
    )
    CASES.append(
        Case(
            "per-row adapters with a gated variant (MoR)",
            call(
                lambda m: _per_row_forward(m, ["default", None], batch=2),
                lambda: lorafx.apply(llama(), lorafx.Spec(example_configs()["mor"], targets=["q_proj"])),
            ),
            SpecError,
            (Q, "variant 'mor'", "cannot run per row"),
        ),
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path):
    fn, model, ctx = case.run(tmp_path)
    before = snapshot(model) if model is not None else None
    with pytest.raises(case.error) as err:
        fn()
    message = str(err.value)
    for needle in case.needles:
        assert needle.format(**ctx) in message, f"{needle!r} not in {message!r}"
    if case.name == "merge twice":  # the first merge succeeded on purpose; the second changed nothing
        assert lorafx.is_merged(model)
    elif model is not None:
        assert_unchanged(before, model)


def markdown_table() -> str:
    rows = ["| bad input | error | message (real run) |", "|---|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            fn, _, _ = case.run(Path(tmp))
            try:
                fn()
                message, cls = "NO ERROR", "-"
            except Exception as e:  # the table shows whatever happened
                message, cls = str(e).replace(tmp, "DIR").replace("|", "\\|"), type(e).__name__
        rows.append(f"| {case.name} | `{cls}` | {message} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
