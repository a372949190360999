"""``lorafx export`` on the command line."""

from __future__ import annotations

import json
import shlex

import numpy as np
import torch

from lorafx.cli import build_parser, main
from lorafx.cli.export_cmd import EPILOG
from lorafx.export import AdapterSession


def test_help_documents_modes_and_examples_parse(capsys):
    text = build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    for word in ("merged", "unmerged", "multi", "adapter_ids", "demo:tiny-llama", "examples:"):
        assert word in text
    for line in EPILOG.splitlines():
        if line.strip().startswith("lorafx export"):
            args = build_parser().parse_args(shlex.split(line.strip())[1:])
            assert args.command == "export" and args.model.startswith("demo:")


def test_export_mlp_unmerged_then_serve(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert (
        main(
            [
                "export",
                "demo:mlp",
                "--mode",
                "unmerged",
                "--variant",
                "lora",
                "--r",
                "4",
                "--targets",
                "up,mid",
                "--out",
                str(out),
                "--check",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    diff = float(printed.rsplit(":", 1)[1])
    assert diff <= 1e-4
    manifest = json.loads((out / "lorafx_export.json").read_text())
    assert manifest["mode"] == "unmerged" and {s["site"] for s in manifest["sites"]} == {"up", "mid"}
    assert manifest["inputs"][0]["shape"] == ["batch", 32]
    sess = AdapterSession(out)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    from lorafx.cli.models import tiny_mlp

    torch.manual_seed(0)
    want = tiny_mlp()(torch.from_numpy(x)).detach().numpy()  # fresh LoRA has B = 0: the base output
    np.testing.assert_allclose(sess.run({"input": x}, adapter="default")["output"], want, atol=1e-5)


def test_unknown_model_source_is_a_clear_error(tmp_path, capsys):
    assert main(["export", "demo:nope", "--out", str(tmp_path)]) == 2
    assert "demo:tiny-llama" in capsys.readouterr().err


def test_export_saved_adapters_multi(tmp_path, capsys):
    import lorafx
    from lorafx.cli.models import tiny_mlp

    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = lorafx.apply(tiny_mlp(), lorafx.Spec(lorafx.LoRA(r=2 * seed, init="random"), targets=["up"]))
        dirs.append(lorafx.save_adapter(m, tmp_path / f"a{seed}"))
    argv = ["export", "demo:mlp", "--mode", "multi", "--out", str(tmp_path / "out"), "--check"]
    assert main(argv + ["--adapter", str(dirs[0]), "--adapter", str(dirs[1])]) == 0
    out = capsys.readouterr().out
    assert "['default', 'default_1']" in out and float(out.rsplit(":", 1)[1]) <= 1e-4
    manifest = json.loads((tmp_path / "out" / "lorafx_export.json").read_text())
    assert manifest["sites"][0]["tensors"]["up.A"]["shape"] == [4, 32]  # the larger rank; rank 2 is padded


def test_export_a_peft_checkpoint_with_its_weights(tmp_path, capsys):
    import lorafx
    from lorafx.cli.models import tiny_llama

    torch.manual_seed(3)
    trained = lorafx.apply(tiny_llama(), lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["q_proj", "v_proj"]))
    lorafx.to_peft(trained, tmp_path / "peft")
    out = tmp_path / "out"
    assert (
        main(
            [
                "export",
                "demo:tiny-llama",
                "--peft",
                str(tmp_path / "peft"),
                "--mode",
                "merged",
                "--out",
                str(out),
                "--check",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert float(text.rsplit("eager:", 1)[1]) < 1e-4
    sess = AdapterSession(out)
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        want = trained(ids).logits.numpy()
    assert [i["name"] for i in sess.manifest["inputs"]] == ["input_ids", "attention_mask"]
    got = sess.run({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"]
    assert abs(got - want).max() < 1e-4  # the PEFT weights, not a fresh init, are in the graph
    assert abs(got - tiny_llama()(ids).logits.detach().numpy()).max() > 1e-3


def test_export_kv_cache_then_generate(tmp_path, capsys):
    """--kv-cache: the graph takes the cache; --check passes; generate equals transformers' generate."""
    from lorafx.cli.models import tiny_llama

    out = tmp_path / "kv"
    argv = ["export", "demo:tiny-llama", "--kv-cache", "--variant", "lora", "--r", "4", "--targets", "q_proj"]
    assert main([*argv, "--out", str(out), "--check"]) == 0
    assert float(capsys.readouterr().out.rsplit("eager:", 1)[1]) < 1e-4
    sess = AdapterSession(out)
    assert "past_key_values.1.value" in [i.name for i in sess.session.get_inputs()]
    ids = torch.randint(3, 256, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a fresh LoRA has B = 0: the base model's tokens
        want = tiny_llama().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    np.testing.assert_array_equal(sess.generate(ids, 5), want.numpy())
