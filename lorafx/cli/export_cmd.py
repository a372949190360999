"""``lorafx export``: export a model with adapters to ONNX (merged, unmerged or multi-adapter).

modes:
  merged    the active adapter folded into the base weights (fp32 sum, rounded once): a plain graph
            with the base model's operators that any ONNX server runs. Refused for gated variants
            (MoR), whose update depends on the input.
  unmerged  each adapted site's tensors (A [R, d_in], B [d_out, R] fed as scale*B; MoR: its own weights,
            router and scale) are named graph inputs; adapter files and lorafx_export.json are written beside
            the model. One graph serves any adapter of the same layout and rank <= R.
  multi     K adapters stacked on a leading axis plus an adapter_ids [batch] input: one run serves
            a batch whose rows use different adapters (Gather + MatMul, standard ONNX only).

--kv-cache exports a causal LM for generation: inputs input_ids, attention_mask, position_ids and
past_key_values.N.key/value, outputs logits and present.N.key/value, one graph for prefill and decode
(lorafx.export.AdapterSession.generate serves it). Causal LMs are exported with an attention_mask
input either way, so left-padded batches run. On an encoder-decoder model (T5, BART) --kv-cache
writes encoder.onnx, decoder.onnx and decoder_with_past.onnx; --check then compares greedy tokens.

Adapters come from --adapter DIR (lorafx.save_adapter directories, repeatable), --peft DIR (a PEFT
LoRA checkpoint, weights included), or a spec (--spec FILE, or --variant/--r/--targets), which adds
freshly initialised adapters: a layout to serve trained adapters with later
(lorafx.export.AdapterSession.load_adapter). With none of these, the default spec applies (LoRA on
every linear site, as in inspect). Models are named as for every lorafx subcommand.
"""

from __future__ import annotations

import argparse

from lorafx.cli.extras import ONNX, require
from lorafx.cli.sources import MODEL_HELP, add_spec_arguments, load_model, spec_from_args
from lorafx.cli.ui import add_command, add_repeatable

EPILOG = """examples:
  lorafx export demo:tiny-llama --mode unmerged --variant lora --r 8 --targets q_proj,v_proj --out out/llama --check
  lorafx export demo:mlp --mode merged --variant lora --r 4 --targets up,mid --out out/mlp
  lorafx export demo:tiny-llama --mode multi --slots 4 --variant lora --r 8 --targets q_proj,v_proj --out out/multi
  lorafx export demo:tiny-llama --kv-cache --mode unmerged --variant lora --r 8 --targets q_proj,v_proj --out out/llama-kv
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export", "export a model with adapters to ONNX (merged | unmerged | multi)", __doc__, EPILOG)
    p.add_argument("model", help=f"model source: {MODEL_HELP}")
    p.add_argument(
        "--mode",
        choices=["merged", "unmerged", "multi"],
        default="unmerged",
        help="export mode (default unmerged; see above)",
    )
    p.add_argument("--out", required=True, help="output directory (model.onnx, lorafx_export.json, adapters/)")
    add_repeatable(p, "--adapter", "DIR", "a lorafx.save_adapter directory to load (repeatable)")
    p.add_argument("--slots", type=int, default=2, help="multi mode with a spec: number of adapter slots K (default 2)")
    p.add_argument("--rank", type=int, help="export width R (>= the adapters' ranks) to serve larger adapters later")
    p.add_argument("--batch", type=int, default=2, help="example batch size (>= 2 keeps the axis dynamic)")
    p.add_argument("--seq", type=int, default=8, help="example sequence length for token models")
    p.add_argument(
        "--kv-cache",
        action="store_true",
        help="causal LMs: export with past_key_values / present for generation; encoder-decoder models: three graphs",
    )
    p.add_argument(
        "--check", action="store_true", help="run onnxruntime on the example and print the max abs diff vs eager"
    )
    add_spec_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import lorafx
    from lorafx.export import compare_export, to_onnx

    if args.rank is not None and (args.mode == "merged" or args.rank < 1):
        why = "a merged export has no adapter inputs" if args.mode == "merged" else "it must be at least 1"
        raise lorafx.SpecError(f"--rank {args.rank}: {why}")
    require(*ONNX)
    torch.manual_seed(0)
    model = load_model(args.model)
    names = []
    if args.peft is not None:  # a PEFT checkpoint brings its weights: export it as an adapter
        model = lorafx.from_peft(model, args.peft, name="peft")
        names.append("peft")
        args.peft = None
    for i, directory in enumerate(args.adapter):
        name = _adapter_name(directory, names, i)
        model = lorafx.load_adapter(model, directory, name=name, activate=not names)
        names.append(name)
    # No adapter and no spec flag: the spec group's documented default (lora on all-linear sites).
    spec = spec_from_args(args, model) if _spec_given(args) or not names else None
    if spec is not None and not _spec_given(args):
        print(f"no --adapter, --peft or spec flags: adding the default spec, {spec.config.name} on all-linear sites")
    if spec is not None:
        count = args.slots if args.mode == "multi" and not names else 1
        for i in range(count):
            name = "default" if count == 1 else f"slot{i}"
            model = lorafx.apply(model, spec, name=name, activate=not names)
            names.append(name)
    lorafx.set_adapter(model, names[0])
    inputs = example_inputs(model, args.batch, args.seq)
    adapters = names if args.mode != "merged" else None
    res = to_onnx(model, inputs, args.out, mode=args.mode, adapters=adapters, rank=args.rank, kv_cache=args.kv_cache)
    if "graphs" in res.manifest:  # --kv-cache on an encoder-decoder model: three graphs
        return _report_seq2seq(model, inputs, res, args, names[0])
    if args.kv_cache:  # --check compares logits and the grown cache at past length = --seq
        from lorafx.export.kv_cache import kv_cache_inputs

        inputs = kv_cache_inputs(model, inputs)
    m = res.manifest
    print(f"wrote {res.onnx_path} ({args.mode}; inputs {[i['name'] for i in m['inputs']]}, outputs {m['outputs']})")
    print(
        f"  {len(lorafx.iter_sites(model))} adapted sites, adapters: {list(m.get('adapters', {})) or m.get('merged_adapter')}"
    )
    if args.check:
        print(f"  max abs diff onnxruntime vs eager: {compare_export(model, inputs, args.out):.2e}")
    return 0


def _report_seq2seq(model, inputs: dict, res, args: argparse.Namespace, adapter: str) -> int:
    """Print the graphs of a seq2seq KV export; ``--check``: greedy tokens of onnxruntime vs eager
    ``generate`` on the example (8 new tokens, no early stop), 1 when they differ."""
    import torch

    import lorafx
    from lorafx.export import AdapterSession

    files = ", ".join(g["file"] for g in res.manifest["graphs"].values())
    print(f"wrote {res.directory} ({args.mode}; {files})")
    print(f"  {len(lorafx.iter_sites(model))} adapted sites, adapters: {list(res.manifest.get('adapters', {}))}")
    if not args.check:
        return 0
    kw = {} if args.mode == "merged" else {"adapter": adapter}
    got = AdapterSession(res.directory).generate(
        inputs["input_ids"], 8, attention_mask=inputs["attention_mask"], eos_token_id=None, **kw
    )
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None).numpy()
    same = got.shape == want.shape and bool((got == want).all())
    print(f"  greedy tokens onnxruntime == eager generate: {same}")
    return 0 if same else 1


def _adapter_name(directory: str, taken: list[str], i: int) -> str:
    """The name saved in the adapter's JSON, or ``<name>_<i>`` when an earlier --adapter took it."""
    import json
    from pathlib import Path

    from lorafx.adapter_files import CONFIG

    path = Path(directory) / CONFIG
    name = json.loads(path.read_text()).get("name", "default") if path.is_file() else "default"
    return name if name not in taken else f"{name}_{i}"


def _spec_given(args: argparse.Namespace) -> bool:
    """Whether any spec flag was given (without one, export only what --adapter/--peft bring)."""
    flags = ("spec", "variant", "r", "alpha", "dropout", "targets", "targets_regex", "exclude")
    return any(getattr(args, k) is not None for k in flags) or bool(args.set)


def example_inputs(model, batch: int, seq: int):
    """Example inputs: token ids and attention mask for transformers models, else one
    positional ``[batch, d_in]`` float tensor (ONNX input name ``input``) sized by the first linear."""
    import torch

    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    return (torch.randn(batch, first.in_features),)
