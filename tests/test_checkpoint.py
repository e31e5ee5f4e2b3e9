"""HF-layout checkpoints: round trips, sharding, tied embeddings, named errors, atomic saves."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kpro
from kpro import checkpoint as ckpt
from kpro import lora


def assert_same_model(a: kpro.Llama, b: kpro.Llama):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    ids = torch.randint(0, a.config.vocab_size, (2, 9))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("tied", [False, True])
def test_single_file_round_trip(tmp_path, make_model, tied):
    model = make_model(dtype=torch.float32, tie_word_embeddings=tied)
    kpro.save_pretrained(model, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert ("lm_head.weight" in names) == (not tied)
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.norm.weight" in names
    loaded = kpro.load_pretrained(tmp_path / "ck")
    assert_same_model(model, loaded)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "float32"


def test_a_mixed_dtype_model_is_saved_without_a_torch_dtype(tmp_path, make_model):
    """config.json's torch_dtype names the dtype of every tensor; a model of several has none to name."""
    model = make_model(dtype=torch.bfloat16)
    model.norm.float()
    kpro.save_pretrained(model, tmp_path / "ck")
    assert "torch_dtype" not in json.loads((tmp_path / "ck" / "config.json").read_text())
    assert load_file(tmp_path / "ck" / "model.safetensors")["model.norm.weight"].dtype == torch.float32


def test_a_tied_config_whose_head_was_untied_is_refused_not_saved_without_it(tmp_path, make_model):
    model = make_model(dtype=torch.float32, tie_word_embeddings=True)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # unties them
    kpro.save_pretrained(model, tmp_path / "equal")  # still equal in value: nothing would be lost
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    with pytest.raises(kpro.CheckpointError, match="tie_word_embeddings is True, but lm_head.weight is no longer"):
        kpro.save_pretrained(model, tmp_path / "ck")
    model.config = model.config.replace(tie_word_embeddings=False)  # the way out the message gives
    kpro.save_pretrained(model, tmp_path / "ck")
    assert_same_model(model, kpro.load_pretrained(tmp_path / "ck"))


def test_a_merged_adapter_changed_since_the_merge_is_refused_not_saved_as_it_was(tmp_path, make_model):
    """Only `merged is None` was checked: an adapter changed in place after its merge (loaded, or stepped) was
    dropped, and the checkpoint held the weight merged with its old values, where the forward refused."""
    model = make_model(dtype=torch.float32)
    lora.add_adapters(model, ["a"], rank=2, seed=0)
    for layer in lora.lora_layers(model):
        layer.merge("a")
    with torch.no_grad():
        model.layers[1].mlp.up_proj.a.lora_B.weight.fill_(0.5)  # e.g. adapters loaded into the merged model
    with pytest.raises(kpro.CheckpointError, match=r"layers.1.mlp.up_proj: adapter 'a' was changed after it was "
                                                   r"merged into the weight.*unmerge\(\) and merge\(\) it again"):
        kpro.save_pretrained(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    for layer in lora.lora_layers(model):
        layer.unmerge()
        layer.merge("a")
    kpro.save_pretrained(model, tmp_path / "ck")
    with lora.active(model, "a"):
        ids = torch.randint(0, 67, (2, 6))
        torch.testing.assert_close(kpro.load_pretrained(tmp_path / "ck")(ids), model(ids))


def test_sharded_round_trip(tmp_path, make_model):
    model = make_model(dtype=torch.float32)
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size=20_000)
    files = sorted(os.listdir(tmp_path / "ck"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ckpt.hf_tensors(model))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ckpt.hf_tensors(model).values())
    for shard in shards:  # within max_shard_size, unless one tensor alone outgrows it
        tensors = load_file(tmp_path / "ck" / shard)
        assert sum(t.nbytes for t in tensors.values()) <= 20_000 or len(tensors) == 1, shard
    assert_same_model(model, kpro.load_pretrained(tmp_path / "ck"))


def test_a_shard_fills_up_to_exactly_max_shard_size(tmp_path, make_model):
    """A shard takes tensors up to exactly max_shard_size (a new one starts only past it, as Hugging Face's
    split_torch_state_dict_into_shards does); every other test's limit fell between two tensors' boundaries."""
    model = make_model(dtype=torch.float32)
    tensors = ckpt.checkpoint_tensors(model)
    names = list(tensors)
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size=sum(tensors[name].nbytes for name in names[:2]))
    weight_map = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(name for name, file in weight_map.items() if file.startswith("model-00001-of-")) == sorted(names[:2])


def test_a_load_while_a_save_replaces_the_directory_takes_one_checkpoint_whole(tmp_path, make_model, monkeypatch):
    """save_pretrained swaps a new directory in at once, but a load opens config.json, the index and each shard by
    path one after another: a swap between two shard opens mixed the two checkpoints' tensors, without an error."""
    old, new = make_model(seed=1, dtype=torch.float32), make_model(seed=2, dtype=torch.float32)
    kpro.save_pretrained(old, tmp_path / "ck", max_shard_size=20_000)
    real_open, opened = ckpt.safe_open, []

    def safe_open_saving_at_the_second(path, **kwargs):  # the first shard is open, the rest not yet
        handle = real_open(path, **kwargs)
        opened.append(path)
        if len(opened) == 2:
            kpro.save_pretrained(new, tmp_path / "ck", max_shard_size=20_000)
        return handle
    monkeypatch.setattr(ckpt, "safe_open", safe_open_saving_at_the_second)
    assert_same_model(new, kpro.load_pretrained(tmp_path / "ck"))  # loaded again, from the new directory alone


def test_a_load_while_its_files_are_rewritten_in_place_takes_one_checkpoint_whole(tmp_path, make_model, monkeypatch):
    """A shard rewritten in place (cp over it, rsync --inplace) keeps its directory's inode and ctime: a load reading
    its tensors meanwhile returned some of the old checkpoint's and some of the new one's, without an error; and the
    loaded tensors were views of the file's memory map, so a rewrite after the load changed the model (a file cut
    short crashed the process with SIGBUS). Each file's inode, modification time and size are now compared before
    and after the load, which starts again on a change, and the tensors are copied out of the map."""
    old, new = make_model(seed=1, dtype=torch.float32), make_model(seed=2, dtype=torch.float32)
    kpro.save_pretrained(old, tmp_path / "ck", max_shard_size=20_000)
    kpro.save_pretrained(new, tmp_path / "new", max_shard_size=20_000)
    for file in (tmp_path / "ck").iterdir():  # saved an hour ago: the rewrite gets another modification time
        os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns - 3600 * 10 ** 9))

    def rewrite(source):
        for file in source.glob("model-*.safetensors"):
            with open(tmp_path / "ck" / file.name, "r+b") as out:
                out.write(file.read_bytes())
    real_open, read = ckpt.safe_open, []

    class Rewritten:  # a shard's handle whose first tensor read rewrites every shard with the new checkpoint's
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, name):
            tensor = self.handle.get_tensor(name)
            if not read:
                read.append(name)
                rewrite(tmp_path / "new")
            return tensor

    class Opener:
        def __init__(self, path, **kwargs):
            self.opened = real_open(path, **kwargs)

        def __enter__(self):
            return Rewritten(self.opened.__enter__())

        def __exit__(self, *exc):
            return self.opened.__exit__(*exc)
    monkeypatch.setattr(ckpt, "safe_open", Opener)
    loaded = kpro.load_pretrained(tmp_path / "ck")
    assert read
    assert_same_model(new, loaded)  # loaded again, the new files alone
    monkeypatch.undo()
    kpro.save_pretrained(old, tmp_path / "old", max_shard_size=20_000)
    rewrite(tmp_path / "old")  # after the load: the model is its own
    assert_same_model(new, loaded)


def test_a_load_that_a_save_interrupts_every_time_is_refused_by_name(tmp_path, make_model, monkeypatch):
    model = make_model(dtype=torch.float32)
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size=20_000)
    real_open = ckpt.safe_open

    def safe_open_saving(path, **kwargs):
        handle = real_open(path, **kwargs)
        kpro.save_pretrained(model, tmp_path / "ck", max_shard_size=20_000)
        return handle
    monkeypatch.setattr(ckpt, "safe_open", safe_open_saving)
    with pytest.raises(kpro.CheckpointError, match=re.escape(f"{tmp_path / 'ck'} was replaced")):
        kpro.load_pretrained(tmp_path / "ck")


def test_load_converts_dtype_and_device(tmp_path, make_model):
    model = make_model(dtype=torch.bfloat16)
    kpro.save_pretrained(model, tmp_path / "ck")
    loaded = kpro.load_pretrained(tmp_path / "ck", dtype=torch.float32, device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight.float())
    assert loaded.rope.inv_freq.dtype == torch.float64 and loaded.rope.inv_freq.device.type == "cpu"


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16, torch.float32])
def test_the_default_dtype_is_the_checkpoints_own(tmp_path, make_model, saved):
    """dtype="auto" (the default) keeps a bf16 checkpoint bf16: re-saved, it keeps its size."""
    model = make_model(dtype=saved)
    kpro.save_pretrained(model, tmp_path / "ck")
    loaded = kpro.load_pretrained(tmp_path / "ck")
    assert {p.dtype for p in loaded.parameters()} == {saved}
    assert torch.equal(loaded.layers[1].self_attn.o_proj.weight, model.layers[1].self_attn.o_proj.weight)
    kpro.save_pretrained(loaded, tmp_path / "again")
    size = lambda d: (d / "model.safetensors").stat().st_size
    assert size(tmp_path / "again") == size(tmp_path / "ck")


def test_the_default_dtype_keeps_each_tensor_of_a_mixed_checkpoint_as_stored(tmp_path, make_model):
    """Norms kept in fp32 beside bf16 matrices (as mixed-precision tools, and train-expanded, save them) loaded as
    bf16, the dtype holding most parameters: rounded (up to 3.9e-3), the logits moved by 6e-3, and a re-save lost
    the fp32 tensors. Each keeps its stored dtype now, bit for bit, the reverse mix too; matrices of two dtypes,
    which no forward runs, are refused by name; a dtype asked for converts every tensor."""
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    ids = torch.tensor([[1, 5, 9, 3]])
    for matrices, norms in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        mixed = {name: t.to(norms if t.dim() == 1 else matrices) for name, t in tensors.items()}
        save_file(mixed, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
        loaded = kpro.load_pretrained(tmp_path / "ck")
        for name, t in kpro.checkpoint.hf_tensors(loaded).items():
            assert t.dtype == mixed[name].dtype and torch.equal(t, mixed[name]), name
        assert loaded(ids).isfinite().all()  # such a model runs: norms compute in float32 whatever theirs
        kpro.save_pretrained(loaded, tmp_path / "again")
        assert {n: t.dtype for n, t in load_file(tmp_path / "again" / "model.safetensors").items()} == {
            n: t.dtype for n, t in mixed.items()}
        assert {p.dtype for p in kpro.load_pretrained(tmp_path / "ck", dtype="bf16").parameters()} == {torch.bfloat16}
    mixed["lm_head.weight"] = mixed["lm_head.weight"].to(torch.float16)
    save_file(mixed, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(kpro.CheckpointError, match=r"the weight matrices are stored in several dtypes \(F32: "
                                                   r"model.embed_tokens.weight, F16: lm_head.weight\), and the model "
                                                   r"computes in one; pass dtype= to convert them all"):
        kpro.load_pretrained(tmp_path / "ck")
    assert kpro.load_pretrained(tmp_path / "ck", dtype="fp32").lm_head.weight.dtype == torch.float32


def test_a_conversion_that_makes_a_weight_infinite_is_refused_by_name(tmp_path, make_model):
    """dtype=float16 turned a weight of 1e5 (beyond float16's 65504) into inf, silently: the logits were inf."""
    model = make_model(dtype=torch.float32)
    with torch.no_grad():
        model.layers[1].post_attention_layernorm.weight[3] = -1e5
    kpro.save_pretrained(model, tmp_path / "ck")
    with pytest.raises(kpro.CheckpointError, match=r"ck: tensor model.layers.1.post_attention_layernorm.weight holds "
                                                   r"100000, beyond float16's largest \(65504\): converting it makes it "
                                                   r"infinite; load it in a dtype that holds it"):
        kpro.load_pretrained(tmp_path / "ck", dtype=torch.float16)
    assert kpro.load_pretrained(tmp_path / "ck", dtype="bf16").layers[1].post_attention_layernorm.weight.isfinite().all()
    with torch.no_grad():  # an infinity stored as such is the checkpoint's own, not the conversion's
        model.layers[1].post_attention_layernorm.weight[3] = float("inf")
    kpro.save_pretrained(model, tmp_path / "inf")
    assert kpro.load_pretrained(tmp_path / "inf", dtype=torch.float16).layers[1].post_attention_layernorm.weight[3] == float("inf")


def test_dtype_names_are_accepted_and_non_float_dtypes_refused(tmp_path, make_model):
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck")
    for name, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                        ("fp32", torch.float32), ("auto", torch.float32)):
        assert {p.dtype for p in kpro.load_pretrained(tmp_path / "ck", dtype=name).parameters()} == {dtype}
    for bad in (torch.int8, torch.float8_e4m3fn, torch.complex64):
        with pytest.raises(ValueError, match=rf"dtype must be torch.float32, torch.bfloat16, torch.float16 or "
                                             rf"torch.float64 \(or its name\), got {bad}"):
            kpro.load_pretrained(tmp_path / "ck", dtype=bad)
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; use auto \(the checkpoint's own\), float32, fp32"):
        kpro.load_pretrained(tmp_path / "ck", dtype="int8")


def test_a_checkpoint_is_loaded_without_drawing_initial_weights(tmp_path, make_model, monkeypatch):
    """The weights come from the file: the model is built on the meta device without kpro's normal init
    (on meta it ran a decomposition whose first call cost seconds; nn.Linear's own reset on meta tensors
    touches no data)."""
    model = make_model(dtype=torch.float32)
    kpro.save_pretrained(model, tmp_path / "ck")

    def no_init(*args, **kwargs):
        raise AssertionError("a model loaded from a checkpoint was initialised")

    monkeypatch.setattr(torch.nn.init, "normal_", no_init)
    assert_same_model(model, kpro.load_pretrained(tmp_path / "ck"))
    with pytest.raises(AssertionError, match="initialised"):  # a new model on the CPU is still initialised
        kpro.Llama(model.config)


def test_a_file_path_and_raw_state_dict_names_are_named(tmp_path, make_model):
    model = make_model(dtype=torch.float32)
    kpro.save_pretrained(model, tmp_path / "ck")
    with pytest.raises(kpro.CheckpointError, match=r"model.safetensors is a file; load_pretrained takes the "
                                                   r"checkpoint directory that holds config.json and the weights"):
        kpro.load_pretrained(tmp_path / "ck" / "model.safetensors")
    save_file({name: t.contiguous() for name, t in model.state_dict().items() if "inv_freq" not in name},
              str(tmp_path / "ck" / "model.safetensors"))  # torch's names: no `model.` prefix
    with pytest.raises(kpro.CheckpointError, match=r"tensor names lack the `model.` prefix of the Hugging Face "
                                                   r"layout .*a raw state dict\?"):
        kpro.load_pretrained(tmp_path / "ck")


def test_unknown_config_fields_warn_as_from_hf_does(tmp_path, make_model):
    """load_pretrained reads config.json as LlamaConfig.from_hf does: an unknown field is one warning (strict_config
    refuses it); a field that changes the math is refused either way."""
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**config, "some_new_field": 1}))
    with pytest.warns(kpro.config.ConfigWarning, match="some_new_field"):
        kpro.load_pretrained(tmp_path / "ck")
    with pytest.raises(kpro.ConfigError, match="some_new_field"):
        kpro.load_pretrained(tmp_path / "ck", strict_config=True)


def _rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_all_named(tmp_path, make_model):
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck")

    def break_it(t):
        del t["model.layers.0.self_attn.k_proj.weight"], t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.7.mlp.gate_proj.weight"] = torch.zeros(2, 2)
        t["model.norm.weight"] = torch.zeros(47)

    _rewrite(tmp_path / "ck" / "model.safetensors", break_it)
    with pytest.raises(kpro.CheckpointError) as err:
        kpro.load_pretrained(tmp_path / "ck")
    text = str(err.value)
    assert "missing tensor(s): model.layers.0.self_attn.k_proj.weight, model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected tensor(s): model.layers.7.mlp.gate_proj.weight" in text
    assert "model.norm.weight [47] (expected [48])" in text


def test_old_rotary_buffers_are_ignored(tmp_path, make_model):
    model = make_model(dtype=torch.float32)
    kpro.save_pretrained(model, tmp_path / "ck")
    _rewrite(tmp_path / "ck" / "model.safetensors",
             lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    assert_same_model(model, kpro.load_pretrained(tmp_path / "ck"))


def test_truncated_and_corrupt_files_are_clear_errors(tmp_path, make_model):
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck", max_shard_size=20_000)
    shard = sorted((tmp_path / "ck").glob("model-00002-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(kpro.CheckpointError, match=f"{shard.name} is not a readable safetensors"):
        kpro.load_pretrained(tmp_path / "ck")
    shard.write_bytes(b"\x00garbage")
    with pytest.raises(kpro.CheckpointError, match="not a readable safetensors"):
        kpro.load_pretrained(tmp_path / "ck")
    shard.unlink()
    with pytest.raises(kpro.CheckpointError, match=f"names shard file.*{shard.name}"):
        kpro.load_pretrained(tmp_path / "ck")


def test_a_weight_file_this_process_may_not_read_is_named_as_such(tmp_path, make_model, monkeypatch):
    """A chmod 000 model.safetensors was "not a readable safetensors file (truncated or corrupt?): No such file or
    directory" (safetensors' words for it). (The suite may run as root, whom chmod does not stop: the refusal is
    made by open, as the system makes it for another user.)"""
    import builtins
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(weights):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    if os.geteuid() == 0:
        monkeypatch.setattr(builtins, "open", refusing_open)
    else:
        os.chmod(weights, 0)
    with pytest.raises(PermissionError, match=re.escape(f"[Errno 13] Permission denied: '{weights}'")):
        kpro.load_pretrained(tmp_path / "ck")


def test_an_index_pointing_at_the_wrong_shard_is_named(tmp_path, make_model):
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck", max_shard_size=20_000)
    index_file = tmp_path / "ck" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    moved = next(name for name, file in index["weight_map"].items() if file != first)
    index["weight_map"][moved] = first
    index_file.write_text(json.dumps(index))
    with pytest.raises(kpro.CheckpointError, match=f"places tensor.* in shards that do not hold them: {moved} .in {first}"):
        kpro.load_pretrained(tmp_path / "ck")


def test_a_tensor_a_shard_holds_but_the_index_does_not_list_is_named(tmp_path, make_model):
    """Only the index's weight_map was read: a shard's extra q_proj.bias loaded without a word (a single file's
    is refused as unexpected). Old rotary buffers are ignored in a shard as in a single file."""
    model = make_model(dtype=torch.float32)
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size=20_000)
    weight_map = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tmp_path / "ck" / weight_map["model.layers.0.self_attn.q_proj.weight"]
    _rewrite(shard, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    assert_same_model(model, kpro.load_pretrained(tmp_path / "ck"))
    _rewrite(shard, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(48)}))
    with pytest.raises(kpro.CheckpointError, match=r"unexpected tensor\(s\): model.layers.0.self_attn.q_proj.bias "
                                                   fr"\(in {shard.name}, but not in model.safetensors.index.json\)$"):
        kpro.load_pretrained(tmp_path / "ck")


def test_a_tensor_listed_twice_or_held_by_two_shards_is_refused(tmp_path, make_model):
    """An index listing model.norm.weight twice loaded its last entry (json.loads keeps the last of duplicate keys),
    and a shard holding a second copy of a tensor the index places in another shard was ignored without a word:
    which copy is the model cannot be told."""
    model = make_model(dtype=torch.float32)
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size=20_000)
    index_file = tmp_path / "ck" / "model.safetensors.index.json"
    text = index_file.read_text()
    weight_map = json.loads(text)["weight_map"]
    home = weight_map["model.norm.weight"]
    other = next(file for file in sorted(set(weight_map.values())) if file != home)
    _rewrite(tmp_path / "ck" / other, lambda t: t.update({"model.norm.weight": torch.full_like(model.norm.weight, 7.0)}))
    entry = f'"model.norm.weight": "{home}"'
    assert entry in text
    index_file.write_text(text.replace(entry, f'{entry}, "model.norm.weight": "{other}"'))  # loaded the 7s
    with pytest.raises(kpro.CheckpointError, match=f"lists 'model.norm.weight' twice \\(\"{home}\" and \"{other}\"\\)"):
        kpro.load_pretrained(tmp_path / "ck")
    index_file.write_text(text)
    with pytest.raises(kpro.CheckpointError, match=fr"unexpected tensor\(s\): model.norm.weight \(a second copy, in "
                                                   fr"{other}; model.safetensors.index.json places it in {home}\)$"):
        kpro.load_pretrained(tmp_path / "ck")


def test_an_index_naming_files_outside_its_directory_is_refused(tmp_path, make_model):
    """An index mapping tensors to ../other/model.safetensors or an absolute path loaded that file's weights, and
    `info` described it: a downloaded checkpoint could read any file. Refused by load_pretrained, info and expand."""
    from kpro.cli import main

    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck", max_shard_size=20_000)
    kpro.save_pretrained(make_model(seed=1, dtype=torch.float32), tmp_path / "other")
    index_file = tmp_path / "ck" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for outside in ("../other/model.safetensors", str(tmp_path / "other" / "model.safetensors"), ".."):
        index_file.write_text(json.dumps({**index, "weight_map": {name: outside for name in index["weight_map"]}}))
        message = f"maps tensors to file(s) that are not a plain file name in its directory: {json.dumps(outside)}"
        with pytest.raises(kpro.CheckpointError, match=re.escape(message)):
            kpro.load_pretrained(tmp_path / "ck")
        assert main(["info", str(tmp_path / "ck")]) == 1
        assert main(["expand", str(tmp_path / "ck"), str(tmp_path / "big"), "--blocks", "1"]) == 1
        assert not (tmp_path / "big").exists()


def test_ambiguous_and_malformed_weight_files_are_refused(tmp_path, make_model):
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck", max_shard_size=20_000)
    kpro.save_pretrained(make_model(seed=1, dtype=torch.float32), tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(tmp_path / "ck" / "model.safetensors")
    with pytest.raises(kpro.CheckpointError, match="holds both model.safetensors and a sharded checkpoint"):
        kpro.load_pretrained(tmp_path / "ck")  # transformers reads the single file, kpro read the shards
    (tmp_path / "ck" / "model.safetensors").unlink()
    index_file = tmp_path / "ck" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for weight_map in (list(index["weight_map"]), {**index["weight_map"], "model.norm.weight": 3}):
        index_file.write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(kpro.CheckpointError, match="'weight_map' must map each tensor name to a shard file"):
            kpro.load_pretrained(tmp_path / "ck")
    # An index that is not UTF-8 (a tensor or file name in another encoding) is named, not a bare UnicodeDecodeError
    index_file.write_bytes(json.dumps(index).replace('"metadata"', '"m\u00e9tadata"').encode("latin-1"))
    with pytest.raises(kpro.CheckpointError, match=r"model.safetensors.index.json is not a valid safetensors index"):
        kpro.load_pretrained(tmp_path / "ck")


def test_a_tied_config_with_a_saved_head_other_than_the_embedding_is_refused(tmp_path, make_model):
    kpro.save_pretrained(make_model(dtype=torch.float32, tie_word_embeddings=True), tmp_path / "ck")
    file = tmp_path / "ck" / "model.safetensors"
    _rewrite(file, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    loaded = kpro.load_pretrained(tmp_path / "ck")  # saved anyway, equal: fine
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    _rewrite(file, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 0.5}))
    with pytest.raises(kpro.CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        kpro.load_pretrained(tmp_path / "ck")  # transformers would untie and use it; kpro dropped it


def test_a_float8_tensor_is_refused(tmp_path, make_model):
    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path / "ck")
    _rewrite(tmp_path / "ck" / "model.safetensors",
             lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)}))
    with pytest.raises(kpro.CheckpointError, match="model.norm.weight has dtype torch.float8_e4m3fn"):
        kpro.load_pretrained(tmp_path / "ck")


def test_directory_without_weights_or_config(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        kpro.load_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(kpro.LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2).to_hf()))
    (tmp_path / "ck" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(kpro.CheckpointError, match="safetensors checkpoints only"):
        kpro.load_pretrained(tmp_path / "ck")


def test_unknown_rope_type_in_checkpoint_config(tmp_path, make_model):
    kpro.save_pretrained(make_model(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(kpro.ConfigError, match="rope_type='yarn'"):
        kpro.load_pretrained(tmp_path / "ck")


def test_save_replaces_old_weights_and_keeps_other_files(tmp_path, make_model):
    target = tmp_path / "ck"
    kpro.save_pretrained(make_model(seed=1, dtype=torch.float32), target, max_shard_size=20_000)
    (target / "tokenizer.model").write_bytes(b"tok")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("kept")
    new = make_model(seed=2, dtype=torch.float32)
    kpro.save_pretrained(new, target)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "notes", "tokenizer.model"]
    assert (target / "tokenizer.model").read_bytes() == b"tok" and (target / "notes" / "a.txt").read_text() == "kept"
    assert_same_model(new, kpro.load_pretrained(target))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporaries left behind


def test_save_through_a_symlink_replaces_the_directory_it_points_to(tmp_path, make_model):
    kpro.save_pretrained(make_model(seed=1, dtype=torch.float32), tmp_path / "run-1")
    (tmp_path / "latest").symlink_to("run-1")
    new = make_model(seed=2, dtype=torch.float32)
    kpro.save_pretrained(new, tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and os.readlink(tmp_path / "latest") == "run-1"
    assert_same_model(new, kpro.load_pretrained(tmp_path / "run-1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-1"]  # no temporaries left behind


def test_save_keeps_the_directorys_permissions_and_its_symbolic_links(tmp_path, make_model):
    """The directory is replaced by a new one: it came back with the mode the umask gives (0o2750 became 0o755,
    the setgid bit of a shared folder lost), and a symbolic link to a data folder in it became a copy of the folder."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f.txt").write_text("data")
    ck = tmp_path / "ck"
    kpro.save_pretrained(make_model(seed=1, dtype=torch.float32), ck)
    (ck / "data").symlink_to(tmp_path / "data")
    (ck / "notes.txt").symlink_to("../data/f.txt")  # a relative one still points where it did
    os.chmod(ck, 0o2750)
    new = make_model(seed=2, dtype=torch.float32)
    kpro.save_pretrained(new, ck)
    assert oct(os.stat(ck).st_mode & 0o7777) == oct(0o2750)
    assert (ck / "data").is_symlink() and os.readlink(ck / "data") == str(tmp_path / "data")
    assert (ck / "notes.txt").is_symlink() and (ck / "notes.txt").read_text() == "data"
    assert_same_model(new, kpro.load_pretrained(ck))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "data"]  # no temporaries left behind


def test_saving_into_a_folder_that_is_not_writable_names_it_and_why(tmp_path, make_model, lock_folder):
    """save_pretrained into a writable directory in a folder that is not writable failed with a PermissionError
    naming '.ck.tmp-...', a temporary the user never named."""
    old = make_model(seed=1, dtype=torch.float32)
    (tmp_path / "shared").mkdir()
    kpro.save_pretrained(old, tmp_path / "shared" / "ck")
    lock_folder(tmp_path / "shared")
    with pytest.raises(PermissionError, match=re.escape(
            f"cannot save {tmp_path / 'shared' / 'ck'}: the folder holding it, {tmp_path / 'shared'}, is not "
            "writable, and the save writes a new directory beside it and swaps it into place (so that a save cut "
            "short leaves the old one as it was); make the folder writable, or save elsewhere")):
        kpro.save_pretrained(make_model(seed=2, dtype=torch.float32), tmp_path / "shared" / "ck")
    assert os.listdir(tmp_path / "shared") == ["ck"]
    assert_same_model(old, kpro.load_pretrained(tmp_path / "shared" / "ck"))


def test_saving_over_a_directory_holding_one_another_run_is_using_is_refused(tmp_path, make_model):
    """save_pretrained into D copies D's other entries into its new directory and swaps it in: what a run holding
    D/run wrote there meanwhile was lost. It is now refused, naming D/run, and D is left as it was."""
    from conftest import held_by_another_run
    from kpro.errors import DirectoryInUse

    old, new = make_model(seed=1, dtype=torch.float32), make_model(seed=2, dtype=torch.float32)
    kpro.save_pretrained(old, tmp_path / "D")
    with held_by_another_run(tmp_path / "D" / "run"):
        with pytest.raises(DirectoryInUse, match=re.escape(f"cannot replace {tmp_path / 'D'}: {tmp_path / 'D' / 'run'} "
                                                           "inside it is in use by another kpro run")):
            kpro.save_pretrained(new, tmp_path / "D")
        assert_same_model(old, kpro.load_pretrained(tmp_path / "D"))
    kpro.save_pretrained(new, tmp_path / "D")
    assert_same_model(new, kpro.load_pretrained(tmp_path / "D"))


def test_saving_to_the_working_directory_or_one_holding_it_is_refused(tmp_path, make_model, monkeypatch):
    """save_pretrained(model, ".") failed with "OSError: [Errno 16] cannot swap ..tmp-... and .: Device or resource
    busy"; by its absolute path it replaced the directory, and left the process in the deleted old copy."""
    old, new = make_model(seed=1, dtype=torch.float32), make_model(seed=2, dtype=torch.float32)
    ck = tmp_path / "ck"
    kpro.save_pretrained(old, ck)
    (ck / "sub").mkdir()
    for cwd, target, shown in ((ck, ".", f". ({ck})"), (ck, "", f". ({ck})"), (ck, ck, str(ck)),
                               (ck / "sub", "..", f".. ({ck})"), (ck / "sub", ck, str(ck))):
        monkeypatch.chdir(cwd)
        with pytest.raises(ValueError, match=re.escape(f"cannot replace {shown}: it is the current working directory "
                                                       "(or holds it), and the directory is replaced whole; save from "
                                                       "outside it or to another path")):
            kpro.save_pretrained(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporaries left behind
    assert sorted(os.listdir(ck)) == ["config.json", "model.safetensors", "sub"]
    assert_same_model(old, kpro.load_pretrained(ck))
    monkeypatch.chdir(tmp_path)
    kpro.save_pretrained(new, "ck")  # from outside it
    assert_same_model(new, kpro.load_pretrained(ck))


def test_failed_save_leaves_old_checkpoint_intact(tmp_path, make_model, monkeypatch):
    target = tmp_path / "ck"
    old = make_model(seed=1, dtype=torch.float32)
    kpro.save_pretrained(old, target)
    calls = []

    def failing_save(tensors, names, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, names, path)

    real_save = ckpt._save_shard
    monkeypatch.setattr(ckpt, "_save_shard", failing_save)
    with pytest.raises(OSError, match="disk full"):
        kpro.save_pretrained(make_model(seed=2, dtype=torch.float32), target, max_shard_size=20_000)
    assert_same_model(old, kpro.load_pretrained(target))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_killed_save_leaves_old_checkpoint_intact_and_is_cleaned_up(tmp_path, make_model):
    target = tmp_path / "ck"
    old = make_model(seed=1, dtype=torch.float32)
    kpro.save_pretrained(old, target)
    script = textwrap.dedent(f"""
        import sys, time, torch, kpro
        from kpro import checkpoint as ckpt
        real = ckpt._save_shard
        def slow(tensors, names, path):
            real(tensors, names, path)
            print("wrote", path.name, flush=True)
            time.sleep(60)
        ckpt._save_shard = slow
        model = kpro.Llama(kpro.LlamaConfig.from_hf({str(target)!r}))
        kpro.save_pretrained(model, {str(target)!r}, max_shard_size=20_000)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("wrote model-00001")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "ck"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".ck.tmp-")
    assert_same_model(old, kpro.load_pretrained(target))
    kpro.save_pretrained(old, target)  # the next save removes the dead process's temporary
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize("size, expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500 mb", 5 * 10**8), (123, 123),
                                            ("3000", 3000),  # the command line passes a byte count as text
                                            ("30KB", 30_000), ("30kib", 30 * 2**10), ("1.5MB", 1_500_000),
                                            ("3MiB", 3 * 2**20), ("7B", 7)])  # KB, MB, GB: decimal, as HF's
def test_parse_size(size, expected):
    assert ckpt.parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", 0, "0GB", -3, "0", "", "GB"])
def test_parse_size_rejects_nonsense(size):
    with pytest.raises(ValueError):
        ckpt.parse_size(size)


def test_a_model_that_does_not_match_its_config_is_not_saved(tmp_path):
    """A block appended by hand was saved under a config.json of 2 blocks: kpro refused the checkpoint, and
    transformers loaded it without the block."""
    import copy
    from conftest import tiny_config
    model = kpro.Llama(tiny_config())
    model.layers.append(copy.deepcopy(model.layers[-1]))
    with pytest.raises(kpro.CheckpointError, match=r"the model does not match its config \(model.config\), which the "
                                                   r"checkpoint's config.json would hold .*\n  unexpected tensor\(s\): "
                                                   r"model.layers.2.input_layernorm.weight"):
        kpro.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.config = model.config.replace(num_hidden_layers=3)
    kpro.save_pretrained(model, tmp_path / "out")
    assert kpro.load_pretrained(tmp_path / "out").config.num_hidden_layers == 3


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_weights_files_are_as_readable_as_the_umask_allows(tmp_path, make_model, mask):
    """safetensors 0.8 created every weights file with mode 0600 whatever the umask: a checkpoint's config was
    readable by others, its weights not."""
    from kpro import train as kt
    from kpro.adapters import save_adapters
    model = make_model(dtype=torch.float32)
    old = os.umask(mask)
    try:
        kpro.save_pretrained(model, tmp_path / "one")
        kpro.save_pretrained(model, tmp_path / "shards", max_shard_size=20_000)
        save_adapters(tmp_path / "adapters", {"model.x": torch.zeros(2)}, {"r": 1})
        kt.save_checkpoint(tmp_path / "run", 1, model, kt.adamw(model), {})
    finally:
        os.umask(old)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert sum(f.suffix == ".safetensors" for f in files) >= 5
    assert {f.relative_to(tmp_path).as_posix(): oct(f.stat().st_mode & 0o777) for f in files} == \
        {f.relative_to(tmp_path).as_posix(): oct(0o666 & ~mask) for f in files}


def test_auto_dtype_refuses_matrices_of_two_dtypes_whichever_holds_more(tmp_path, make_model):
    """"auto" loaded the dtype holding most parameters (two large fp32 tensors, embedding and head, 393k
    parameters, beside 19 small bf16 ones, 38k: fp32), converting the others. Matrices of two dtypes are refused
    now, whichever holds more: which to convert to is the caller's choice (dtype=)."""
    kpro.save_pretrained(make_model(dtype=torch.float32, vocab_size=4096, tie_word_embeddings=False), tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    big = {"model.embed_tokens.weight", "lm_head.weight"}
    mixed = {n: t.to(torch.float32 if n in big else torch.bfloat16) for n, t in tensors.items()}
    assert sum(n in big for n in mixed) < sum(n not in big for n in mixed)
    assert sum(t.numel() for n, t in mixed.items() if n in big) > sum(t.numel() for n, t in mixed.items() if n not in big)
    save_file(mixed, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(kpro.CheckpointError, match=r"the weight matrices are stored in several dtypes"):
        kpro.load_pretrained(tmp_path / "ck")
    for dtype in (torch.float32, torch.bfloat16):
        assert {p.dtype for p in kpro.load_pretrained(tmp_path / "ck", dtype=dtype).parameters()} == {dtype}


def test_the_index_total_size_of_a_bf16_sharded_save_counts_two_bytes_a_parameter(tmp_path, make_model):
    """Only fp32 models were saved sharded in the tests: an index whose total_size counted 4 bytes a parameter
    whatever the dtype passed them."""
    model = make_model(dtype=torch.bfloat16)
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size=10_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    on_disk = sum(t.nbytes for name in shards for t in load_file(tmp_path / "ck" / name).values())
    assert index["metadata"]["total_size"] == on_disk == \
        sum(t.numel() * 2 for t in kpro.checkpoint.hf_tensors(model).values())


@pytest.mark.parametrize("stored, value, wanted", [(torch.float64, 1e39, torch.float32),
                                                   (torch.float32, 3.4e38, torch.bfloat16)])
def test_a_conversion_that_makes_a_weight_infinite_is_refused_whatever_the_dtypes(tmp_path, make_model, stored,
                                                                                  value, wanted):
    """Not only float16 overflows: float64 -> float32, and float32 -> bfloat16 (whose largest, 3.39e38, is below
    float32's)."""
    model = make_model(dtype=stored)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[1, 2] = value
    kpro.save_pretrained(model, tmp_path / "ck")
    assert torch.isinf(torch.tensor(value, dtype=stored).to(wanted))
    name = str(wanted).removeprefix("torch.")
    with pytest.raises(kpro.CheckpointError, match=re.escape(f"tensor model.layers.0.mlp.down_proj.weight holds "
                                                             f"{value:g}, beyond {name}'s largest")):
        kpro.load_pretrained(tmp_path / "ck", dtype=wanted)


# Mutation round 12
def test_a_runs_newest_checkpoint_is_the_highest_step_numerically(tmp_path):
    """step-10 is newer than step-9 (compared as numbers, not as names)."""
    from kpro._safetensors import described_non_checkpoint
    for step in ("step-9", "step-10"):
        (tmp_path / step).mkdir()
        (tmp_path / step / "config.json").write_text("{}")
    assert described_non_checkpoint(tmp_path).endswith(f"its newest checkpoint, {tmp_path / 'step-10'}")


# Mutation round 12
def test_a_weight_map_with_a_backslash_path_is_refused(tmp_path):
    """`..\\other.safetensors` is a path on Windows: refused as outside the checkpoint, even where a file of
    that name exists (a POSIX name may hold a backslash)."""
    from kpro._safetensors import read_weight_map
    from kpro.errors import CheckpointError
    (tmp_path / "..\\other.safetensors").write_bytes(b"")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "..\\other.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain file name in its directory"):
        read_weight_map(index)


# Mutation round 12
def test_a_temporary_of_another_users_live_process_is_not_abandoned(monkeypatch):
    """kill(pid, 0) failing with EPERM means the process exists (another user's): its save is in progress."""
    from kpro import _files

    def eperm(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(_files.os, "kill", eperm)
    assert _files.abandoned(".x.tmp-999999-abcd1234", 999999) is False
