"""Nothing lost, nothing silently accepted: atomic adapter directories, finite merges, the scale as
state, adapter names, and the per-model lock (issue 13). Each test fails on the code before it."""

from __future__ import annotations

import json
import pathlib
import shutil
import threading
import time

import pytest
import torch
from model_state import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file
from tolerances import assert_close

import lorafx
from lorafx.adapter_files import CONFIG, WEIGHTS, read_adapter_dir
from lorafx.cli.models import TinyMLP, tiny_llama
from lorafx.errors import AdapterFileError, NotMergeableError, SpecError

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def llama():
    return tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)


def adapted(alpha=8.0, seed=0, model=None):
    torch.manual_seed(seed)
    spec = lorafx.Spec(lorafx.LoRA(r=4, alpha=alpha, init="random"), targets=["q_proj", "v_proj", "up_proj"])
    return lorafx.apply(model if model is not None else llama(), spec)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# -- atomic, self-consistent directories -------------------------------------------------------------


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    first, second = adapted(8.0, seed=0), adapted(64.0, seed=1)
    lorafx.save_adapter(first, tmp_path / "ad")
    real = pathlib.Path.write_text

    def broken(self, *args, **kwargs):
        if self.name.startswith(f".{CONFIG}"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", broken)
    with pytest.raises(AdapterFileError, match=CONFIG):
        lorafx.save_adapter(second, tmp_path / "ad")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([CONFIG, WEIGHTS])  # nothing left behind
    loaded = lorafx.load_adapter(llama(), tmp_path / "ad")
    assert torch.equal(logits(loaded), logits(first))


def test_concurrent_saves_never_mix_and_readers_never_see_a_torn_pair(tmp_path):
    models = [adapted(8.0, seed=0), adapted(64.0, seed=1)]
    target = tmp_path / "ad"
    saved = []
    for i, m in enumerate(models):
        lorafx.save_adapter(m, tmp_path / f"ref{i}")
        meta, tensors = read_adapter_dir(tmp_path / f"ref{i}")
        saved.append((meta["spec"], tensors))
    lorafx.save_adapter(models[0], target)
    stop = threading.Event()
    reads, errors = [], []

    def writer(m):
        for _ in range(20):
            lorafx.save_adapter(m, target)

    def reader():
        while not stop.is_set():
            try:
                meta, tensors = read_adapter_dir(target)
                reads.append((meta["spec"], tensors))
            except Exception as e:  # any error here is a torn read
                errors.append(e)

    def one_of_the_saves(read) -> bool:
        spec, tensors = read
        return any(
            spec == s and tensors.keys() == t.keys() and all(torch.equal(tensors[k], t[k]) for k in t) for s, t in saved
        )

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert len(reads) > 10
    assert all(one_of_the_saves(r) for r in reads)
    final = logits(lorafx.load_adapter(llama(), target))
    assert any(torch.equal(final, logits(m)) for m in models)


def test_json_and_tensors_from_two_saves_are_refused(tmp_path):
    lorafx.save_adapter(adapted(8.0, seed=0), tmp_path / "a")
    lorafx.save_adapter(adapted(8.0, seed=1), tmp_path / "b")
    shutil.copy(tmp_path / "b" / WEIGHTS, tmp_path / "a" / WEIGHTS)
    model = llama()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="do not belong together"):
        lorafx.load_adapter(model, tmp_path / "a")
    assert_unchanged(before, model)


def test_paths_expand_home_and_bad_paths_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model = adapted()
    lorafx.save_adapter(model, "~/ad")
    assert (tmp_path / "ad" / CONFIG).is_file()
    assert torch.equal(logits(lorafx.load_adapter(llama(), "~/ad")), logits(model))
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFileError, match="not a directory"):
        lorafx.save_adapter(model, tmp_path / "file")
    with pytest.raises(AdapterFileError, match="not a directory"):
        lorafx.to_peft(model, tmp_path / "file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / CONFIG).mkdir()
    (tmp_path / "d" / WEIGHTS).write_bytes(b"")
    with pytest.raises(AdapterFileError, match="is a directory"):
        lorafx.load_adapter(llama(), tmp_path / "d")


# -- finite merges and loads --------------------------------------------------------------------------


def test_merge_refuses_nan_and_leaves_the_model_untouched():
    model = adapted()
    sites = lorafx.iter_sites(model)
    v = sites["model.layers.0.self_attn.v_proj"].adapters["default"]
    with torch.no_grad():
        v.lora_B[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(NotMergeableError, match=r"v_proj.*non-finite.*NaN/Inf in the adapter"):
        lorafx.merge(model)
    assert_unchanged(before, model)


def test_merge_refuses_overflow_of_a_half_precision_base():
    model = TinyMLP(8, 8, 4).half()
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, alpha=2, init="random"), targets=["up"]))
    with torch.no_grad():
        a = lorafx.iter_sites(model)["up"].adapters["default"]
        a.lora_A.fill_(300.0)
        a.lora_B.fill_(300.0)  # ΔW = 2·300·300 = 180,000 > 65,504
    before = snapshot(model)
    with pytest.raises(NotMergeableError, match=r"'up'.*beyond the range of float16"):
        lorafx.merge(model)
    assert_unchanged(before, model)


def test_load_refuses_non_finite_tensors_unless_asked(tmp_path):
    d = lorafx.save_adapter(adapted(), tmp_path / "ad")
    tensors = load_file(str(d / WEIGHTS))
    key = "model.layers.0.mlp.up_proj.lora_A"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(d / WEIGHTS))
    model = llama()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=rf"non-finite.*{key}"):
        lorafx.load_adapter(model, d)
    assert_unchanged(before, model)
    loaded = lorafx.load_adapter(model, d, allow_nonfinite=True)
    assert torch.isinf(lorafx.iter_sites(loaded)["model.layers.0.mlp.up_proj"].adapters["default"].lora_A).any()


def test_verify_merge_fails_on_non_finite_outputs():
    model = lorafx.apply(TinyMLP(8, 8, 4), lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["up"]))
    x = torch.randn(3, 8)
    x[0, 0] = float("inf")
    with pytest.raises(NotMergeableError, match="non-finite"):
        lorafx.verify_merge(model, x)


# -- the scale is state -------------------------------------------------------------------------------


def test_set_scale_survives_files_peft_and_state_dict(tmp_path):
    model = adapted()
    lorafx.set_scale(model, 0.75)
    want = logits(model)
    assert not torch.equal(want, logits(adapted()))  # the scale matters
    lorafx.save_adapter(model, tmp_path / "ad")
    assert_close(logits(lorafx.load_adapter(llama(), tmp_path / "ad")), want)
    lorafx.to_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(cfg["alpha_pattern"].values()) == {0.75 * 4}
    assert_close(logits(lorafx.from_peft(llama(), tmp_path / "peft")), want)
    fresh = adapted(seed=5)
    fresh.load_state_dict(model.state_dict())
    assert_close(logits(fresh), want)


# -- adapter names and the lock -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["training", "forward", "to", "cuda", "_modules"])
def test_names_that_are_module_attributes_are_refused(name):
    model = llama()
    before = snapshot(model)
    with pytest.raises(SpecError, match=f"{name!r}"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), targets=["q_proj"]), name=name)
    assert_unchanged(before, model)


def test_unilora_names_with_double_underscores_train_save_and_delete_apart(tmp_path):
    spec = lorafx.Spec(lorafx.UniLoRA(r=2, vector_length=64), targets=["q_proj"])
    model = lorafx.apply(llama(), spec, name="a")
    model = lorafx.apply(model, spec, name="a__b")
    lorafx.set_adapter(model, "a__b")
    model(IDS, labels=IDS).loss.backward()
    vectors = dict(model.lorafx_shared.items())
    assert vectors["a__b__unilora"].theta.grad is not None
    assert vectors["a__unilora"].theta.grad is None
    lorafx.save_adapter(model, tmp_path / "ab")
    assert torch.equal(logits(lorafx.load_adapter(llama(), tmp_path / "ab")), logits(model))
    lorafx.delete_adapter(model, "a")
    assert list(model.lorafx_shared) == ["a__b__unilora"]


def test_using_adapter_survives_the_previous_adapter_being_deleted():
    model = adapted()
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), targets=["q_proj"]), name="other", activate=False)
    with lorafx.using_adapter(model, "other"):
        lorafx.delete_adapter(model, "default")
    assert lorafx.active_adapter(model) is None
    assert lorafx.adapter_names(model) == ["other"]


def test_state_changes_wait_for_a_request_in_flight():
    model = adapted()
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), targets=["q_proj"]), name="other", activate=False)
    inside, seen = threading.Event(), []

    def request():
        with lorafx.using_adapter(model, "other"):
            inside.set()
            time.sleep(0.3)
            seen.append(lorafx.active_adapter(model))  # nobody switched it meanwhile

    t = threading.Thread(target=request)
    t.start()
    inside.wait()
    lorafx.set_adapter(model, None)  # waits for the request
    t.join()
    assert seen == ["other"]
    assert lorafx.active_adapter(model) is None


def test_meta_device_then_to_empty_keeps_the_scale():
    """Built on the meta device, materialised with to_empty and loaded: the scale is the config's
    (to_empty leaves garbage in buffers), and the output equals the model built on CPU."""
    spec = lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random"), targets=["up", "mid"])
    torch.manual_seed(0)
    ref = lorafx.apply(TinyMLP(8, 8, 4), spec)
    with torch.device("meta"):
        meta = lorafx.apply(TinyMLP(8, 8, 4), spec)
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(ref.state_dict(), strict=True)
    for sa in lorafx.iter_sites(meta).values():
        assert float(sa.adapters["default"].scale) == 8 / 4
    x = torch.randn(3, 8)
    assert torch.equal(meta(x), ref(x))


# -- export directories -------------------------------------------------------------------------------


def test_failed_export_keeps_the_previous_export_and_foreign_directories_are_refused(tmp_path, monkeypatch):
    import lorafx.export
    from lorafx.export import exporter

    model = lorafx.apply(TinyMLP(8, 8, 4), lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=["up"]))
    x = torch.randn(2, 8)
    first = lorafx.export.to_onnx(model, x, tmp_path / "out", mode="unmerged")
    before = {p.name: p.read_bytes() for p in first.directory.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed halfway")

    monkeypatch.setattr(exporter, "_export_graph", broken)
    with pytest.raises(RuntimeError, match="halfway"):
        lorafx.export.to_onnx(model, x, tmp_path / "out", mode="merged")
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before  # the previous export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(lorafx.ExportError, match="holds other files"):
        lorafx.export.to_onnx(model, x, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # a .onnx path writes that file and its manifest beside the user's files, which stay
    lorafx.export.to_onnx(model, x, tmp_path / "mine" / "model.onnx")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["lorafx_export.json", "model.onnx", "notes.txt"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
