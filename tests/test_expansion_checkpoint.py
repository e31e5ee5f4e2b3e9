"""`python -m kpro expand` and `train-expanded`: checkpoints expanded by streaming, and post-pretraining
of the new blocks from the command line."""
import argparse
import json
import os
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file

import kpro
from kpro.cli import main
from kpro.expansion.checkpoint import EXPANSION_FILE, expand_checkpoint, read_expansion_record
from kpro.expansion.posttrain import train_expanded
from kpro.train import read_metrics
from conftest import held_by_another_run, randomize_norms, tiny_config


def write_checkpoint(directory, dtype=torch.bfloat16, max_shard_size="5GB", **overrides):
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(**overrides)).to(dtype)
    randomize_norms(model, torch.Generator().manual_seed(1))
    kpro.save_pretrained(model, directory, max_shard_size=max_shard_size)
    return model


def safetensors_header(path):
    """(the header's length, its tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return length, header


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_cli_expand_matches_in_memory_expansion(tmp_path, capsys, sharded):
    source = write_checkpoint(tmp_path / "src", num_hidden_layers=4, max_shard_size="20KB" if sharded else "5GB")
    kpro.CharTokenizer("abcdefgh").save(tmp_path / "src")
    (tmp_path / "src" / "README.md").write_text("model card\n")
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"stale weights of the unexpanded model")
    (tmp_path / "src" / "additional_chat_templates").mkdir()  # transformers' files of a tokenizer's named templates
    (tmp_path / "src" / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    (tmp_path / "src" / "notes").mkdir()
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file() == sharded

    args = ["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "2"]
    assert main(args + (["--max-shard-size", "30KB"] if sharded else [])) == 0
    out = capsys.readouterr().out
    assert "4 -> 6 blocks (interleave); new blocks 2, 5" in out and "left behind: notes, pytorch_model.bin" in out

    expanded = kpro.load_pretrained(tmp_path / "dst", dtype=torch.bfloat16)
    reference = kpro.load_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    kpro.expand(reference, 2)
    assert expanded.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(expanded.state_dict()[name], tensor), name
    ids = torch.randint(0, source.config.vocab_size, (2, 7))
    assert torch.equal(expanded(ids), source(ids))
    assert (tmp_path / "dst" / "model.safetensors.index.json").is_file() == sharded
    sizes = {}  # each file's tensor bytes: a shard's within --max-shard-size, unless one tensor alone outgrows it
    for file in sorted((tmp_path / "dst").glob("*.safetensors")):
        length, header = safetensors_header(file)
        assert length % 8 == 0, file  # the format aligns the data that follows the header to 8 bytes
        sizes[file.name] = [end - start for start, end in (h["data_offsets"] for h in header.values())]
        assert sum(sizes[file.name]) <= 30_000 or len(sizes[file.name]) == 1 or not sharded, (file, sizes)
    if sharded:
        index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
        assert len(sizes) > 2 and index["metadata"]["total_size"] == sum(map(sum, sizes.values()))
    assert isinstance(kpro.load_tokenizer(tmp_path / "dst"), kpro.CharTokenizer)
    assert (tmp_path / "dst" / "README.md").read_text() == "model card\n"
    assert (tmp_path / "dst" / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    assert not (tmp_path / "dst" / "pytorch_model.bin").exists()
    record = json.loads((tmp_path / "dst" / EXPANSION_FILE).read_text())
    assert record["new_blocks"] == [2, 5] and record["copied_from"] == [0, 1, 1, 2, 3, 3]
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["num_hidden_layers"] == 6


def test_a_buffer_of_no_bytes_is_refused(tmp_path):
    write_checkpoint(tmp_path / "src", num_hidden_layers=2)
    with pytest.raises(ValueError, match="buffer_bytes must be a positive integer, got 0"):  # blamed the source before
        expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2, buffer_bytes=0)


def test_expand_streams_through_a_small_buffer(tmp_path):
    """Peak Python memory stays near the copy buffer, far below the checkpoint (by design: tensors are
    copied as byte ranges, never loaded)."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=2, hidden_size=128,
                     intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
    checkpoint_bytes = (tmp_path / "src" / "model.safetensors").stat().st_size
    assert checkpoint_bytes > 3_000_000
    tracemalloc.start()
    try:
        expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2, position="top", buffer_bytes=64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < checkpoint_bytes / 10, (peak, checkpoint_bytes)
    assert kpro.load_pretrained(tmp_path / "dst").config.num_hidden_layers == 4


def test_expanded_checkpoint_keeps_every_byte_and_dtype(tmp_path):
    write_checkpoint(tmp_path / "src", dtype=torch.float16, num_hidden_layers=2, tie_word_embeddings=True)
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1, position="bottom")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as src, \
            safe_open(str(tmp_path / "dst" / "model.safetensors"), "pt") as dst:
        assert "lm_head.weight" not in dst.keys()
        assert torch.equal(dst.get_tensor("model.layers.2.mlp.up_proj.weight"), src.get_tensor("model.layers.1.mlp.up_proj.weight"))
        assert torch.equal(dst.get_tensor("model.layers.0.mlp.up_proj.weight"), src.get_tensor("model.layers.0.mlp.up_proj.weight"))
        zero = dst.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert zero.dtype == torch.float16 and not zero.any()


def test_a_source_that_a_save_replaces_while_it_is_expanded_is_refused_not_mixed(tmp_path, monkeypatch):
    """expand reads config.json and the headers, then opens each shard by path as it copies: a save_pretrained
    into the source meanwhile (it swaps a new directory in) gave an expansion mixing two checkpoints' bytes."""
    from kpro.expansion import checkpoint as expansion_checkpoint

    write_checkpoint(tmp_path / "src", dtype=torch.float32, max_shard_size="20KB")
    torch.manual_seed(5)
    other = kpro.Llama(tiny_config()).float()
    real_copy, copies = expansion_checkpoint._copy_range, []

    def copy_saving_at_the_second(src, *args):  # a shard of the old source is being copied
        copies.append(src.name)
        if len(copies) == 2:
            kpro.save_pretrained(other, tmp_path / "src", max_shard_size="20KB")
        return real_copy(src, *args)
    monkeypatch.setattr(expansion_checkpoint, "_copy_range", copy_saving_at_the_second)
    with pytest.raises(kpro.CheckpointError, match=f"{tmp_path / 'src'} was replaced while"):
        expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1)
    assert not (tmp_path / "dst").exists()


def test_cli_expand_errors_are_one_line(tmp_path, capsys):
    write_checkpoint(tmp_path / "src", num_hidden_layers=4)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [
        (["expand", str(tmp_path / "src"), str(tmp_path / "a"), "--blocks", "3"], "3 does not"),
        (["expand", str(tmp_path / "nowhere"), str(tmp_path / "a"), "--blocks", "2"], "does not exist"),
        (["expand", str(tmp_path / "src"), str(tmp_path / "taken"), "--blocks", "2"], "already exists"),
        # a MemoryError traceback before (a layout list of that length)
        (["expand", str(tmp_path / "src"), str(tmp_path / "a"), "--blocks", "99999999999999", "--position", "top"],
         "99999999999999 new blocks are more than 1024 times the model's 4 blocks (4096 at most)"),
    ]
    for args, message in cases:
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and (tmp_path / "taken" / "file").read_text() == "x"
    with pytest.raises(SystemExit):
        main(["expand", str(tmp_path / "src"), str(tmp_path / "a"), "--blocks", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "taken"), "--blocks", "2", "--overwrite"]) == 0
    assert (tmp_path / "taken" / "config.json").is_file() and (tmp_path / "taken" / "file").read_text() == "x"


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    write_checkpoint(tmp_path / "src", num_hidden_layers=2)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(kpro.CheckpointError, match="missing tensor"):
        expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_tensors_load_pretrained_refuses_are_refused(tmp_path, sharded):
    """Only names and shapes were checked: a tied config's saved lm_head.weight other than the embedding, and an
    int32 model.norm.weight, both refused by load_pretrained, were expanded into a checkpoint that cannot load."""
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path / "src", dtype=torch.bfloat16, tie_word_embeddings=True, num_hidden_layers=2)
    tensors = load_file(tmp_path / "src" / "model.safetensors")

    def rewrite(**changed):
        state = {**tensors, **changed}
        for file in (tmp_path / "src").glob("model*.safetensors*"):
            file.unlink()
        if not sharded:
            save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
            return
        last = {"lm_head.weight", "model.norm.weight"}  # in a shard of their own, away from the embedding
        shards = {"model-00001-of-00002.safetensors": {n: t for n, t in state.items() if n not in last},
                  "model-00002-of-00002.safetensors": {n: t for n, t in state.items() if n in last}}
        for file, part in shards.items():
            save_file(part, tmp_path / "src" / file, metadata={"format": "pt"})
        index = {"weight_map": {name: file for file, part in shards.items() for name in part}}
        (tmp_path / "src" / "model.safetensors.index.json").write_text(json.dumps(index))

    head = tensors["model.embed_tokens.weight"].clone()
    rewrite(**{"lm_head.weight": head})  # saved anyway, equal: fine (compared a few elements at a time)
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1, "top", buffer_bytes=12)
    assert kpro.load_pretrained(tmp_path / "dst").config.num_hidden_layers == 3
    head[-1, -1] += 1  # the last element, in the last chunk
    for changed, message in [({"lm_head.weight": head}, "lm_head.weight differs from model.embed_tokens.weight"),
                             ({"lm_head.weight": tensors["model.embed_tokens.weight"].float()}, None),
                             ({"model.norm.weight": tensors["model.norm.weight"].to(torch.int32)},
                              r"tensor model.norm.weight has dtype I32; expected F64, F32, BF16 or F16")]:
        rewrite(**changed)
        if message is None:  # a head stored in another dtype is compared in the embedding's, as load_pretrained does
            kpro.load_pretrained(tmp_path / "src")
            expand_checkpoint(tmp_path / "src", tmp_path / "ok", 1, "top", buffer_bytes=12)
            continue
        with pytest.raises(kpro.CheckpointError):
            kpro.load_pretrained(tmp_path / "src")
        with pytest.raises(kpro.CheckpointError, match=message):
            expand_checkpoint(tmp_path / "src", tmp_path / "refused", 1, "top", buffer_bytes=12)
        assert not (tmp_path / "refused").exists()


# ------------------------------------------------------------------------------------------ train-expanded

def test_cli_train_expanded_trains_only_the_new_blocks_and_resumes(tmp_path, capsys):
    alphabet = "abcdefgh \n"
    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=3 + len(alphabet), max_position_embeddings=32)
    kpro.CharTokenizer(alphabet).save(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top",
                 "--max-shard-size", "1KB"]) == 0  # sharded: the first shard holds the embedding alone
    assert len(list((tmp_path / "big").glob("model-*.safetensors"))) > 2
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    run = tmp_path / "run"
    args = ["train-expanded", str(tmp_path / "big"), "--data", str(corpus), "--out", str(run), "--seq-len", "16",
            "--batch-size", "4", "--lr", "1e-2", "--recompute-frozen", "--save-every", "2"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "4"]) == 0  # the same run, continued
    out = capsys.readouterr().err  # status and progress, on stderr
    assert "training blocks 2; frozen: 0-1 without autograd" in out and "resumed from" in out
    # said before the silent tokenizing (20 s for 29 MB), not only after it
    assert out.index(f"tokenizing 1 corpus file ({corpus.stat().st_size / 1e6:.1f} MB) in memory ...") \
        < out.index("training blocks 2")
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]

    trained = kpro.load_pretrained(run / "final", dtype=torch.bfloat16)
    start = kpro.load_pretrained(tmp_path / "big", dtype=torch.bfloat16)
    assert json.loads((run / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in start.state_dict().items():
        assert torch.equal(trained.state_dict()[name], tensor) != name.startswith("layers.2."), name
    assert isinstance(kpro.load_tokenizer(run / "final"), kpro.CharTokenizer)
    assert isinstance(kpro.load_tokenizer(run / "step-00000004"), kpro.CharTokenizer)


def test_too_few_steps_for_a_runs_default_warmup_are_refused_in_flags(tmp_path, capsys, monkeypatch):
    """A rerun with fewer --steps than the saved default warmup got the schedule's own words: "a cosine schedule
    needs total_steps > warmup_steps (got total_steps=2, warmup_steps=5)", of a warmup the user never set, where
    the run was past those steps or stopped within its warmup."""
    import kpro.expansion.posttrain as posttrain
    alphabet = "abcdefgh \n"
    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=3 + len(alphabet), max_position_embeddings=32)
    kpro.CharTokenizer(alphabet).save(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    run = tmp_path / "run"
    args = ["train-expanded", str(tmp_path / "big"), "--data", str(corpus), "--out", str(run), "--seq-len", "16",
            "--batch-size", "4"]
    real_fit = posttrain.fit

    class StopAtStep3(kpro.train.Callback):
        def on_step_end(self, run, metrics):
            if run.step == 3:
                run.stop()
    monkeypatch.setattr(posttrain, "fit", lambda *a, callbacks=(), **k: real_fit(*a, callbacks=[*callbacks,
                                                                                             StopAtStep3()], **k))
    assert main(args + ["--steps", "100"]) == 0  # a run of 100 steps (warmup 5) stopped at step 3
    monkeypatch.setattr(posttrain, "fit", real_fit)
    capsys.readouterr()
    assert main(args + ["--steps", "4"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --out {run} holds a run at step 3 whose learning rate warms up over its first 5 steps (the warmup "
        "it started with: its --warmup-steps, by default 5% of its --steps): --steps 4 would end within them; pass "
        "--steps 6 or more to continue it, or another --out for a new run")
    assert main(args + ["--steps", "2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --out {run} holds a run at step 3, past --steps 2: pass --steps 3 or more to continue it (--steps "
        "3: it is done), or another --out for a new run")
    assert main(args + ["--steps", "6"]) == 0
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    # a first run refused (an empty corpus) leaves none of the folders it made, its run record included
    (tmp_path / "empty.txt").write_text("")
    assert main(["train-expanded", str(tmp_path / "big"), "--data", str(tmp_path / "empty.txt"), "--out",
                 str(tmp_path / "new" / "sub" / "run"), "--steps", "2"]) == 1
    assert not (tmp_path / "new").exists()


def test_train_expanded_refuses_to_resume_onto_another_source_checkpoint(tmp_path, capsys):
    """A run resumed after its checkpoint was expanded again from another source went on silently: the
    checkpoint's weights replaced the new expansion's, and the final model's frozen blocks were the first
    source's. The run records a digest of the source's weights; another one is refused, naming it."""
    alphabet = "abcdefgh \n"
    for name, seed in (("src", 0), ("src2", 1)):
        write_checkpoint(tmp_path / name, num_hidden_layers=2, vocab_size=3 + len(alphabet),
                         max_position_embeddings=32)
        if seed:  # another model of the same shape
            model = kpro.load_pretrained(tmp_path / name, dtype=torch.bfloat16)
            torch.manual_seed(seed)
            for p in model.parameters():
                p.data.normal_()
            kpro.save_pretrained(model, tmp_path / name)
        kpro.CharTokenizer(alphabet).save(tmp_path / name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    run = tmp_path / "run"
    args = ["train-expanded", str(tmp_path / "big"), "--data", str(corpus), "--out", str(run), "--seq-len", "16",
            "--batch-size", "4", "--save-every", "2", "--steps", "4"]
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top"]) == 0
    assert main(args) == 0
    for directory in (run / "step-00000004", run / "final"):
        for file in directory.iterdir():
            file.unlink()
        directory.rmdir()
    assert main(["expand", str(tmp_path / "src2"), str(tmp_path / "big"), "--blocks", "1", "--position", "top",
                 "--overwrite"]) == 0
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    err = err[err.index("error: "):]  # after the status lines
    assert err.count("\n") == 1 and f"{run} was started from another source checkpoint" in err, err
    assert str(tmp_path / "big") in err and not (run / "final").exists()


def test_train_expanded_resumed_on_other_data_names_data_and_seq_len(tmp_path, capsys):
    """Refused in Batches' words ("the checkpoint's data had num_examples=..., these have ...: other data, or the
    same cut into rows of another length (seq_len)"), naming neither --data nor --seq-len."""
    alphabet = "abcdefgh \n"
    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=3 + len(alphabet), max_position_embeddings=32)
    kpro.CharTokenizer(alphabet).save(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top"]) == 0
    corpus, other = tmp_path / "corpus.txt", tmp_path / "other.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    other.write_text("\n\n".join("bca efd hg " * (i % 4 + 1) for i in range(40)))  # as many rows, other tokens
    run = tmp_path / "run"
    args = ["train-expanded", str(tmp_path / "big"), "--out", str(run), "--batch-size", "4", "--steps", "2"]
    assert main(args + ["--data", str(corpus), "--seq-len", "16"]) == 0
    rows = int(capsys.readouterr().err.split("corpus: ")[1].split(" rows")[0])
    assert main(args + ["--data", str(corpus), "--seq-len", "8", "--steps", "3"]) == 1
    printed = capsys.readouterr()
    now, err = int(printed.err.split("corpus: ")[1].split(" rows")[0]), printed.err
    err = err[err.index("error: "):]  # after the status lines
    assert err.startswith(f"error: --out {run} holds a run trained on {rows} rows, and --data {corpus} at --seq-len 8 "
                          f"packs {now}: resume with the run's --data and --seq-len, or pass another --out "
                          "for a new run\n"), err
    assert main(args + ["--data", str(other), "--seq-len", "16", "--steps", "3"]) == 1
    err = capsys.readouterr().err
    err = err[err.index("error: "):]  # after the status lines
    assert err.startswith(f"error: --out {run} holds a run trained on other rows than the {rows} that --data {other} "
                          "at --seq-len 16 packs (as many): resume with the run's --data and --seq-len, or pass "
                          "another --out for a new run\n"), err
    assert main(args + ["--data", str(corpus), "--data", str(other), "--steps", "3"]) == 1  # the default --seq-len
    err = capsys.readouterr().err
    assert f"and --data {corpus} --data {other} at the default --seq-len (min(512, the model's " \
           "max_position_embeddings)) packs" in err, err


def test_expand_and_train_expanded_leave_convert_ggufs_record_behind(tmp_path):
    """kpro_gguf.json (convert-gguf's record of its own output) was copied into the expansion and the run's
    checkpoints: convert-gguf then took them for its own output and replaced them, trained model and all."""
    from kpro.convert.gguf_llama import RECORD_NAME, _check_replaceable
    from kpro.expansion.posttrain import train_expanded
    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=13)
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    (tmp_path / "src" / RECORD_NAME).write_text('{"source": "m.gguf"}\n')
    result = expand_checkpoint(tmp_path / "src", tmp_path / "big", 1, "top")
    assert RECORD_NAME not in result.copied_files and not (tmp_path / "big" / RECORD_NAME).exists()
    (tmp_path / "big" / RECORD_NAME).write_text('{"source": "m.gguf"}\n')  # the source of train-expanded, too
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    final = train_expanded(tmp_path / "big", corpus, tmp_path / "run", steps=1, seq_len=16, batch_size=4)
    for directory in (final, tmp_path / "run" / "step-00000001"):
        assert (directory / "kpro_char_tokenizer.json").is_file() and not (directory / RECORD_NAME).exists()
        with pytest.raises(FileExistsError, match="was not written by convert-gguf"):
            _check_replaceable(directory)


def test_train_expanded_holds_out_dir_until_its_final_model_is_written(tmp_path, monkeypatch):
    """fit released out_dir before train_expanded wrote out_dir/final: a second run there, started meanwhile with
    more steps, trained and wrote its final model, and the first then swapped in its own, of fewer steps. out_dir
    is now held from the start to the final model (and, held by another run, refused before anything is loaded)."""
    import threading
    from kpro._run_lock import holding
    from kpro.errors import DirectoryInUse
    from kpro.expansion import posttrain

    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=13)
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    expand_checkpoint(tmp_path / "src", tmp_path / "big", 1, "top")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    out = tmp_path / "run"

    def loading(*args, **kwargs):
        raise AssertionError("loaded the model of a run that is refused")
    with held_by_another_run(out), monkeypatch.context() as patch:
        patch.setattr(posttrain, "load_pretrained", loading)
        with pytest.raises(DirectoryInUse, match="in use by another kpro run"):
            train_expanded(tmp_path / "big", corpus, out, steps=1, seq_len=16, batch_size=4)
    refused, write = [], posttrain.on_main

    def other_run():
        try:
            with holding(out):
                pass
        except DirectoryInUse:
            refused.append(True)

    def writing(work, env, what):
        if what.startswith("write"):
            thread = threading.Thread(target=other_run)
            thread.start()
            thread.join()
        return write(work, env, what)
    monkeypatch.setattr(posttrain, "on_main", writing)
    final = train_expanded(tmp_path / "big", corpus, out, steps=1, seq_len=16, batch_size=4)
    assert refused == [True] and final == out / "final" and not (out / ".kpro-run.lock").exists()


def test_a_training_checkpoint_as_source_keeps_the_runs_own_trainer_state(tmp_path):
    """A training checkpoint (step-*) expanded again had its trainer_state.json copied into the expansion, and from
    there over the new run's own summary in every checkpoint and in final/ (step 3 of the old run where the new one
    was at step 2). fit's files are never copied from a source, and copying never replaces a file already there."""
    from kpro.expansion.checkpoint import _copy_other_files
    from kpro.expansion.posttrain import train_expanded
    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=13)
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    expand_checkpoint(tmp_path / "src", tmp_path / "pro1", 1, "top")
    train_expanded(tmp_path / "pro1", corpus, tmp_path / "run1", steps=3, seq_len=16, batch_size=4)
    step3 = tmp_path / "run1" / "step-00000003"
    fit_files = {"trainer_state.json", "trainer_state.pt", "optimizer.pt"}
    assert fit_files <= {p.name for p in step3.iterdir()}
    result = expand_checkpoint(step3, tmp_path / "pro2", 1, "top")
    assert result.copied_files == ["kpro_char_tokenizer.json"] and fit_files <= set(result.skipped)
    assert not fit_files & {p.name for p in (tmp_path / "pro2").iterdir()}
    (tmp_path / "pro2" / "trainer_state.json").write_text('{"step": 3}\n')  # the old summary, put back by hand
    final = train_expanded(tmp_path / "pro2", corpus, tmp_path / "run2", steps=2, seq_len=16, batch_size=4)
    summary = json.loads((tmp_path / "run2" / "step-00000002" / "trainer_state.json").read_text())
    assert summary["step"] == 2 and summary["total_steps"] == 2, summary
    assert not fit_files & {p.name for p in final.iterdir()}  # a model, as the run's source was
    (tmp_path / "into").mkdir()
    (tmp_path / "into" / "kpro_char_tokenizer.json").write_text("mine")
    assert _copy_other_files(tmp_path / "src", tmp_path / "into") == ([], ["kpro_char_tokenizer.json"])
    assert (tmp_path / "into" / "kpro_char_tokenizer.json").read_text() == "mine"


def test_the_checkpoint_dtype_is_the_one_holding_most_parameters_over_every_shard(tmp_path):
    """train-expanded takes the digest of its source in it: a bfloat16 model whose norms are float32 is a bfloat16
    checkpoint."""
    from kpro.expansion.posttrain import checkpoint_dtype
    model = kpro.Llama(tiny_config(num_hidden_layers=2)).to(torch.bfloat16)
    for module in model.modules():
        if "Norm" in type(module).__name__:
            module.float()
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size="20KB")
    assert len(list((tmp_path / "ck").glob("model-*.safetensors"))) > 2
    assert checkpoint_dtype(tmp_path / "ck") == torch.bfloat16


def test_train_expanded_saves_each_tensor_in_its_source_dtype(tmp_path):
    """A source of bfloat16 matrices and float32 norms (a mixed-precision export): the final model was cast whole
    to the dtype holding most parameters, so the frozen blocks' norm weights were rounded to bfloat16 (changes up to
    4e-3). Each tensor is saved in its source dtype: the frozen ones bit for bit."""
    from safetensors.torch import load_file
    from kpro.expansion.posttrain import train_expanded
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(num_hidden_layers=2, vocab_size=13))
    randomize_norms(model, torch.Generator().manual_seed(1))  # float32 values bfloat16 cannot hold
    norms = {name: p.detach().clone() for name, p in model.named_parameters() if "norm" in name}
    model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norms:
                p.data = norms[name]
    kpro.save_pretrained(model, tmp_path / "src")
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    expand_checkpoint(tmp_path / "src", tmp_path / "big", 1, "top")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    final = train_expanded(tmp_path / "big", corpus, tmp_path / "run", steps=2, seq_len=16, batch_size=4, lr=1e-2)
    source, trained = load_file(tmp_path / "big" / "model.safetensors"), load_file(final / "model.safetensors")
    assert trained.keys() == source.keys()
    assert {t.dtype for t in source.values()} == {torch.bfloat16, torch.float32}
    for name, tensor in source.items():
        assert trained[name].dtype == tensor.dtype, name
        assert torch.equal(trained[name], tensor) != name.startswith("model.layers.2."), name


def test_cli_train_expanded_errors(tmp_path, capsys):
    write_checkpoint(tmp_path / "plain", num_hidden_layers=2, vocab_size=12)
    kpro.CharTokenizer("abcdefghi").save(tmp_path / "plain")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n\nxyz\n")
    cases = [
        (["--data", str(corpus)], "no kpro_expansion.json"),
        (["--data", str(corpus), "--train-blocks", "5"], "block index 5 is out of range"),
        (["--data", str(tmp_path / "none.txt"), "--train-blocks", "1"], "corpus file"),
        (["--data", str(corpus), "--train-blocks", "1"], "character 'x' is not in the alphabet"),
        (["--data", str(corpus), "--data", str(tmp_path / "." / "corpus.txt"), "--train-blocks", "1"],
         "is given twice"),  # read twice before
    ]
    for extra, message in cases:
        assert main(["train-expanded", str(tmp_path / "plain"), "--out", str(tmp_path / "run")] + extra) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err, err
    for record in ('{"new_blocks": ["4", 5]}', "[1]", '{"new_blocks": []}', "{oops"):  # tracebacks before
        (tmp_path / "plain" / "kpro_expansion.json").write_text(record)
        assert main(["train-expanded", str(tmp_path / "plain"), "--out", str(tmp_path / "run"), "--data", str(corpus)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "kpro_expansion.json" in err and err.count("\n") == 1, err


def test_per_layer_config_lists_are_extended_with_the_blocks(tmp_path):
    """config.json's layer_types gets an entry per new block (it kept the source's length before: transformers
    refused the expanded checkpoint, num_hidden_layers 6 against 4 layer types); a list of the wrong length
    is refused."""
    transformers = pytest.importorskip("transformers")
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=4)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"] * 4}))
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2)
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["num_hidden_layers"] == 6 and written["layer_types"] == ["full_attention"] * 6
    assert transformers.AutoConfig.from_pretrained(tmp_path / "dst").num_hidden_layers == 6

    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"] * 3}))
    with pytest.raises(kpro.config.ConfigError, match="unsupported layer_types=.*one entry per block"):
        expand_checkpoint(tmp_path / "src", tmp_path / "bad", 2)
    assert not (tmp_path / "bad").exists()


def test_a_stale_expansion_record_is_refused(tmp_path, capsys):
    """kpro.save_pretrained into an expanded checkpoint's directory keeps its kpro_expansion.json: after a
    second expansion in memory, train-expanded trained the first expansion's blocks 2 and 5 (now old blocks)
    of the 8, not the new 6 and 7."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=4)
    kpro.CharTokenizer("abcdefgh").save(tmp_path / "src")
    expand_checkpoint(tmp_path / "src", tmp_path / "pro", 2)
    model = kpro.load_pretrained(tmp_path / "pro")
    kpro.save_pretrained(model, tmp_path / "pro")  # the same blocks (after training them, say): the record holds
    assert read_expansion_record(tmp_path / "pro")["new_blocks"] == [2, 5]
    assert kpro.expand(model, 2, position="top") == [6, 7]
    kpro.save_pretrained(model, tmp_path / "pro")
    with pytest.raises(kpro.CheckpointError, match="records an expansion to 6 blocks, but .* num_hidden_layers=8"):
        read_expansion_record(tmp_path / "pro")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n\ndef\n")
    assert main(["train-expanded", str(tmp_path / "pro"), "--data", str(corpus), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is stale" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_expand_of_a_source_with_a_stale_or_broken_record_says_what_to_do_for_expand(tmp_path, capsys):
    """expand of a directory whose kpro_expansion.json is stale (or not a record) told the user to name
    --train-blocks, a flag of train-expanded. It is refused still (ignoring it would leave the source's untrained
    blocks, if any, out of the new record without a word), saying to delete it to expand."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=4)
    expand_checkpoint(tmp_path / "src", tmp_path / "pro", 2)
    model = kpro.load_pretrained(tmp_path / "pro")
    kpro.expand(model, 2)
    kpro.save_pretrained(model, tmp_path / "pro")  # 8 blocks; the record of 6 stays
    record = tmp_path / "pro" / EXPANSION_FILE
    for broken in (False, True):
        if broken:
            record.write_text('{"new_blocks": []}')
        assert main(["expand", str(tmp_path / "pro"), str(tmp_path / "pro2"), "--blocks", "2"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {record}") and ("is stale" in err) != broken and err.count("\n") == 1, err
        assert "delete it to expand this checkpoint" in err and "--train-blocks" not in err, err
        assert not (tmp_path / "pro2").exists()
    record.unlink()
    assert expand_checkpoint(tmp_path / "pro", tmp_path / "pro2", 2).earlier_new_blocks == []


def test_a_destination_holding_only_the_lock_file_a_killed_expand_left_is_empty(tmp_path):
    """An expand killed outright (SIGKILL, the OOM killer) leaves DST holding its hidden run lock file alone, and
    the same command again was refused: "already exists and is not empty" (ls shows it empty)."""
    from kpro._run_lock import LOCK_FILE
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=2)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / LOCK_FILE).write_text("")
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2)
    assert read_expansion_record(tmp_path / "dst")["num_new_blocks"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "NOTES.md").write_text("mine\n")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        expand_checkpoint(tmp_path / "src", tmp_path / "other", 2)


def test_overwrite_replaces_the_model_and_keeps_the_users_files(tmp_path):
    """--overwrite deleted everything in DST: notes, an eval_results/ directory. It replaces a model
    directory's files only, stale weights of another layout included."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=4)
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2)
    (tmp_path / "dst" / "NOTES.md").write_text("mine\n")
    (tmp_path / "dst" / "eval_results").mkdir()
    (tmp_path / "dst" / "eval_results" / "r.json").write_text("{}\n")
    (tmp_path / "dst" / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (tmp_path / "dst" / "tokenizer.json").write_text("{}")  # another model's tokenizer
    (tmp_path / "data").mkdir()
    (tmp_path / "dst" / "data").symlink_to(tmp_path / "data")  # a link to the user's folder stays a link
    os.chmod(tmp_path / "dst", 0o2750)  # and the directory keeps its permissions
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 4, overwrite=True)
    names = {p.name for p in (tmp_path / "dst").iterdir()}
    assert {"NOTES.md", "eval_results", "model.safetensors", EXPANSION_FILE} <= names
    assert (tmp_path / "dst" / "data").is_symlink() and os.stat(tmp_path / "dst").st_mode & 0o7777 == 0o2750
    assert not {"model-00001-of-00002.safetensors", "tokenizer.json"} & names
    assert read_expansion_record(tmp_path / "dst")["num_new_blocks"] == 4


def test_overwrite_refuses_a_token_shard_directory(tmp_path, capsys):
    """expand SRC D --overwrite on D of `python -m kpro tokenize` deleted its tokens-*.bin (weights of another
    format, to expand) and kept index.json and the *.starts.npy: D was broken. It is refused, untouched."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32)
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    (tmp_path / "c.txt").write_text("abc def\n\ngh\n")
    assert main(["tokenize", "--tokenizer", str(tmp_path / "src"), "--data", str(tmp_path / "c.txt"),
                 "--out", str(tmp_path / "D"), "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "D").iterdir()}
    capsys.readouterr()
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "D"), "--blocks", "1", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: the destination {tmp_path / 'D'} holds token shards (index.json of `python -m kpro "
                   "tokenize`), which overwrite (--overwrite) would break: their tokens-*.bin are weights of another "
                   "format to it; choose another directory\n"), err
    assert {p.name: p.read_bytes() for p in (tmp_path / "D").iterdir()} == before


def test_overwrite_refuses_a_directory_another_run_is_using(tmp_path):
    """expand --overwrite swapped DST out from under the train-expanded run writing there (every other command
    refuses a directory in use): it now holds DST's run lock too."""
    from kpro._run_lock import LOCK_FILE
    from kpro.errors import DirectoryInUse

    write_checkpoint(tmp_path / "src", dtype=torch.float32)
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2)
    before = (tmp_path / "dst" / "config.json").read_text()
    with held_by_another_run(tmp_path / "dst"):
        with pytest.raises(DirectoryInUse, match="in use by another kpro run"):
            expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1, overwrite=True)
        assert (tmp_path / "dst" / "config.json").read_text() == before
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1, overwrite=True)
    assert read_expansion_record(tmp_path / "dst")["num_new_blocks"] == 1
    assert not (tmp_path / "dst" / LOCK_FILE).exists()  # released, and not carried into the new directory
    expand_checkpoint(tmp_path / "src", tmp_path / "new", 1)  # a new DST: held while written, then released
    assert not (tmp_path / "new" / LOCK_FILE).exists()


def test_overwrite_refuses_a_directory_holding_one_another_run_is_using(tmp_path, capsys):
    """expand --overwrite held DST, but not the directories inside it, which it copies into the new DST before the
    swap: what a run in DST/run wrote between the copy and the swap was lost. Such a DST is now refused, naming
    the directory in use; one a killed run left its lock file in is not."""
    from kpro._run_lock import LOCK_FILE

    write_checkpoint(tmp_path / "src", dtype=torch.float32)
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2)
    (tmp_path / "dst" / "runs" / "a").mkdir(parents=True)
    (tmp_path / "dst" / "runs" / "a" / "step-1.txt").write_text("1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "dst").iterdir() if p.is_file()}
    with held_by_another_run(tmp_path / "dst" / "runs" / "a"):
        assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "1", "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot replace {tmp_path / 'dst'}: {tmp_path / 'dst' / 'runs' / 'a'} inside "
                              "it is in use by another kpro run (process another thread of this process, ") and \
            err.endswith("), and what that run writes there would be lost (the directory is replaced whole, "
                         "its other files copied over first); wait for it to end, or choose another directory\n"), err
        assert {p.name: p.read_bytes() for p in (tmp_path / "dst").iterdir() if p.is_file()} == before
    (tmp_path / "dst" / "runs" / "a" / LOCK_FILE).write_text("12345")  # left by a run killed meanwhile
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1, overwrite=True)
    assert read_expansion_record(tmp_path / "dst")["num_new_blocks"] == 1
    assert sorted(p.name for p in (tmp_path / "dst" / "runs" / "a").iterdir()) == ["step-1.txt"]


def test_a_full_disk_is_one_line_naming_what_it_could_not_do(tmp_path, capsys, monkeypatch):
    """ENOSPC or EROFS ended `python -m kpro` in a traceback."""
    import errno
    from kpro.expansion import checkpoint as expansion_checkpoint

    write_checkpoint(tmp_path / "src", dtype=torch.float32)
    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(expansion_checkpoint, "_write_safetensors", full)
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "1"]) == 1
    err = capsys.readouterr().err  # named as the file it was to be, not as the swap's temporary (gone by then)
    assert err == f"error: cannot write or read ({tmp_path / 'dst' / 'model.safetensors'}): no space left on device\n"
    assert not (tmp_path / "dst").exists()


def test_overwriting_in_a_folder_that_is_not_writable_is_one_line_naming_it(tmp_path, capsys, lock_folder):
    """expand --overwrite into a DST whose folder is not writable named '.dst.tmp-...', a temporary the user never
    named (save_pretrained and convert-gguf share the swap)."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32)
    (tmp_path / "out").mkdir()
    expand_checkpoint(tmp_path / "src", tmp_path / "out" / "dst", 1)
    lock_folder(tmp_path / "out")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "out" / "dst"), "--blocks", "2", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot save {tmp_path / 'out' / 'dst'}: the folder holding it, {tmp_path / 'out'}, "
                          "is not writable") and ".tmp-" not in err and err.count("\n") == 1, err
    assert read_expansion_record(tmp_path / "out" / "dst")["num_new_blocks"] == 1


def test_expanding_an_untrained_expansion_keeps_its_new_blocks_in_the_record(tmp_path, capsys):
    """The source's own record was dropped: its zero-initialised blocks 2 and 5, untrained, became blocks 3 and 7
    of the second expansion, and train-expanded left them frozen as identities without a word. Blocks trained
    since (o_proj and down_proj no longer zero) are ordinary blocks of the next expansion."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=4)
    expand_checkpoint(tmp_path / "src", tmp_path / "e1", 2)
    assert main(["expand", str(tmp_path / "e1"), str(tmp_path / "e2"), "--blocks", "3"]) == 0
    assert "the source's own new blocks, untrained per its kpro_expansion.json, are now blocks 3, 7" in \
        capsys.readouterr().out
    record = read_expansion_record(tmp_path / "e2")
    assert record["new_blocks"] == [2, 3, 5, 7, 8] and record["earlier_new_blocks"] == [3, 7]
    model = kpro.load_pretrained(tmp_path / "e1")
    with torch.no_grad():
        model.layers[5].mlp.down_proj.weight.add_(0.5)  # block 5 trained, block 2 not
    kpro.save_pretrained(model, tmp_path / "e1")  # the record stays: the weights tell
    result = expand_checkpoint(tmp_path / "e1", tmp_path / "e3", 3)
    assert result.earlier_new_blocks == [3] and read_expansion_record(tmp_path / "e3")["new_blocks"] == [2, 3, 5, 8]


@pytest.mark.parametrize("text, message", [("{oops", "is not valid JSON"), ("[1]", "does not hold a JSON object")])
def test_an_unreadable_config_is_named(tmp_path, capsys, text, message):
    """A config.json that is not a JSON object: a traceback (TypeError: expected str, bytes or os.PathLike
    object, not list) or json's bare message naming no file, before."""
    write_checkpoint(tmp_path / "src", num_hidden_layers=2)
    (tmp_path / "src" / "config.json").write_text(text)
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and message in err and err.count("\n") == 1, err
    assert err.count("config.json") == 1, err  # named once, not "…/config.json: …/config.json is not valid JSON"
    assert not (tmp_path / "dst").exists()


def test_overwrite_must_be_a_bool(tmp_path):
    """overwrite="False" is truthy: it replaced an existing expansion."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, num_hidden_layers=2)
    expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1)
    before = (tmp_path / "dst" / "model.safetensors").read_bytes()
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'False'"):
        expand_checkpoint(tmp_path / "src", tmp_path / "dst", 2, overwrite="False")
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == before


def test_a_shard_whose_header_lies_about_a_tensors_size_is_refused_naming_the_source(tmp_path):
    """A sharded source is read only through its headers: a tensor whose dtype code no longer fits its
    bytes was expanded, and the error came later, naming the output's shard."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, max_shard_size="1KB", num_hidden_layers=2)
    weight_map = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    shard = tmp_path / "src" / weight_map[name]
    raw = shard.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    header[name]["dtype"] = "BF16"  # its bytes hold F32: twice what BF16 of that shape takes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    with pytest.raises(kpro.CheckpointError, match=fr"{shard.name}: tensor {name} takes \d+ bytes, but its shape "
                                                   r"\[\d+, \d+\] in BF16 needs \d+"):
        expand_checkpoint(tmp_path / "src", tmp_path / "dst", 1, "top")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("change", ["dtype list", "not an object"])
def test_a_malformed_shard_header_is_one_line_naming_the_file(tmp_path, capsys, change):
    """A shard's header entry with "dtype": ["F32"] ended `python -m kpro expand` in a traceback (TypeError:
    unhashable type: 'list'), and so did a header that is JSON but not an object (AttributeError)."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, max_shard_size="1KB", num_hidden_layers=2)
    shard = tmp_path / "src" / "model-00002-of-00021.safetensors"
    raw = shard.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    if change == "dtype list":
        name = next(name for name in header if name != "__metadata__")
        header[name]["dtype"] = [header[name]["dtype"]]
    else:
        header = [header]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard}") and "header" in err and err.count("\n") == 1, err
    assert not (tmp_path / "dst").exists()


def test_a_tensor_a_shard_holds_but_the_index_does_not_list_is_refused_not_dropped(tmp_path, capsys):
    """Only the index's weight_map was read: a shard's extra q_proj.bias was left out of the expansion without
    a word (a single file's is refused as unexpected)."""
    from safetensors.torch import load_file, save_file
    from kpro.checkpoint import INDEX_NAME
    write_checkpoint(tmp_path / "src", dtype=torch.float32, max_shard_size="20KB", num_hidden_layers=2)
    weight_map = json.loads((tmp_path / "src" / INDEX_NAME).read_text())["weight_map"]
    shard = tmp_path / "src" / weight_map["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(48)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "1"]) == 1
    err = capsys.readouterr().err
    named = f"unexpected tensor(s): model.layers.0.self_attn.q_proj.bias (in {shard.name}, but not in {INDEX_NAME})"
    assert err.startswith("error: ") and named in err, err
    assert not (tmp_path / "dst").exists()


def test_a_second_copy_of_a_tensor_in_another_shard_is_refused_not_dropped(tmp_path, capsys):
    """A shard holding a copy of model.norm.weight that the index places in another shard: the expansion took the
    indexed one without a word. Which copy is the model cannot be told: refused, as load_pretrained refuses it."""
    from safetensors.torch import load_file, save_file
    from kpro.checkpoint import INDEX_NAME
    write_checkpoint(tmp_path / "src", dtype=torch.float32, max_shard_size="20KB", num_hidden_layers=2)
    weight_map = json.loads((tmp_path / "src" / INDEX_NAME).read_text())["weight_map"]
    home = weight_map["model.norm.weight"]
    other = next(file for file in sorted(set(weight_map.values())) if file != home)
    tensors = load_file(tmp_path / "src" / other)
    tensors["model.norm.weight"] = torch.full_like(load_file(tmp_path / "src" / home)["model.norm.weight"], 7.0)
    save_file(tensors, tmp_path / "src" / other, metadata={"format": "pt"})
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "1"]) == 1
    err = capsys.readouterr().err
    named = f"unexpected tensor(s): model.norm.weight (a second copy, in {other}; {INDEX_NAME} places it in {home})"
    assert err.startswith("error: ") and named in err, err
    assert not (tmp_path / "dst").exists()


def test_expanding_into_the_working_directory_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """`python -m kpro expand ../src .` from an empty directory failed with "cannot swap ..tmp-... and .:
    Device or resource busy"."""
    write_checkpoint(tmp_path / "src", num_hidden_layers=2)
    (tmp_path / "dst").mkdir()
    monkeypatch.chdir(tmp_path / "dst")
    assert main(["expand", "../src", ".", "--blocks", "1"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot replace . ({tmp_path / 'dst'}): it is the current working directory (or holds " \
                  "it), and the directory is replaced whole; save from outside it or to another path\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"] and not any((tmp_path / "dst").iterdir())


def test_train_expanded_refuses_a_run_directory_in_the_checkpoint_and_bad_arguments(tmp_path):
    """Only the command line refused an out_dir inside the checkpoint: from Python, the run's steps and
    metrics.jsonl were written into it and copied into every checkpoint as if they were tokenizer files."""
    from kpro.expansion.posttrain import train_expanded
    write_checkpoint(tmp_path / "big", num_hidden_layers=2, vocab_size=12)
    kpro.CharTokenizer("abcdefghi").save(tmp_path / "big")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n\ndef\n")
    files = sorted(p.name for p in (tmp_path / "big").iterdir())
    for out, what in ((tmp_path / "big", "the checkpoint"), (tmp_path / "big" / "run", "inside the checkpoint")):
        with pytest.raises(ValueError, match=f"out_dir {out} is {what} {tmp_path / 'big'}: the run writes beside it"):
            train_expanded(tmp_path / "big", corpus, out, blocks=[1], steps=1)
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == files
    for kwargs, message in ((dict(data=corpus, blocks=torch.tensor(1)), "blocks must be a list of block indices"),
                            (dict(data=str(corpus).encode(), blocks=[1]), "data must be a path"),
                            (dict(data=[corpus, 3], blocks=[1]), "data must be a path")):
        with pytest.raises(TypeError, match=message):  # "iteration over a 0-d tensor", "expected str ... not int"
            train_expanded(tmp_path / "big", out_dir=tmp_path / "run", steps=1, **kwargs)


def test_train_expanded_names_a_checkpoint_directory_that_does_not_exist_or_is_a_file(tmp_path, capsys):
    """A DIR that did not exist (a typo), or a file, was said to have no kpro_expansion.json and told to name
    --train-blocks; with --train-blocks, the tokenizer's loader spoke instead. Named as expand names its SRC."""
    from kpro.expansion.posttrain import train_expanded
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n\ndef\n")
    for directory, message in ((tmp_path / "llama-pro-ini", f"checkpoint directory {tmp_path / 'llama-pro-ini'} "
                                "does not exist"),
                               (corpus, f"{corpus} is a file, not a checkpoint directory")):
        for blocks in (None, [1]):
            with pytest.raises(FileNotFoundError, match=message):
                train_expanded(directory, corpus, tmp_path / "run", blocks=blocks, steps=1)
        assert main(["train-expanded", str(directory), "--data", str(corpus), "--out", str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {message}\n", err
    assert not (tmp_path / "run").exists()


def test_train_blocks_with_an_empty_entry_is_refused(tmp_path, capsys):
    """--train-blocks 2,,1 trained blocks 2 and 1: a missing index was dropped without a word."""
    from kpro.cli_args import block_list
    assert block_list("4, 9,14") == [4, 9, 14]
    for text in ("2,,1", ",3,", "2, ,5", ""):
        with pytest.raises(Exception, match="expected block indices separated by commas"):
            block_list(text)


def test_a_shard_whose_tensor_offsets_point_at_another_tensors_bytes_is_refused(tmp_path, capsys):
    """A shard header whose gate_proj offsets pointed at up_proj's bytes (the safetensors library, and so
    load_pretrained, refuses it) was expanded into a checkpoint that loads, gate_proj a copy of up_proj."""
    write_checkpoint(tmp_path / "src", dtype=torch.float32, max_shard_size="40KB", num_hidden_layers=2)
    weight_map = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())["weight_map"]
    name, other = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert weight_map[name] == weight_map[other]
    shard = tmp_path / "src" / weight_map[name]
    raw = shard.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    header[name]["data_offsets"] = list(header[other]["data_offsets"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--blocks", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard}: ") and "data_offsets" in err and err.count("\n") == 1, err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8),
     r"tensor b's data_offsets \[4, 8\] do not start where the tensor before it ends \(byte 8\)"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8),
     r"tensor a's data_offsets \[4, 8\] do not start where the data begins \(byte 0\)"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8),
     r"the tensors' data ends at byte 4 of the data, but the file holds 8 bytes of data after its header"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, bytes(4),
     r"tensor a takes 4 bytes, but its shape \[3\] in F32 needs 12"),
    ({"a": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
     r"tensor a has an unknown dtype code 'Q99'"),
    ({"__metadata__": [1, 2], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
     r"__metadata__ must be an object of strings to strings, got \[1, 2\]"),
    ({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
     r"__metadata__ must be an object of strings to strings"),
], ids=["overlap", "gap", "trailing bytes", "size", "dtype", "metadata list", "metadata value"])
def test_read_header_refuses_what_the_safetensors_library_refuses(tmp_path, header, data, message):
    """read_header checked only that a tensor's bytes lie inside the file: overlapping or scattered offsets, a
    size that does not match the shape, an unknown dtype, and a __metadata__ that is not a map of strings were
    accepted, and the streamed expand copied whatever bytes the offsets pointed at."""
    from safetensors import safe_open
    from kpro._safetensors import read_header
    file = tmp_path / "x.safetensors"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)
    with pytest.raises(Exception):
        with safe_open(str(file), "pt"):
            pass
    with pytest.raises(kpro.CheckpointError, match=f"^{file}: {message}"):
        read_header(file)


def test_read_header_takes_what_the_safetensors_library_takes(tmp_path):
    """Sub-byte dtypes, empty tensors at one offset, tensors listed out of order, no __metadata__ or a null one."""
    from safetensors import safe_open
    from kpro._safetensors import read_header
    file = tmp_path / "x.safetensors"
    header = {"__metadata__": None, "z": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
              "e1": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]},
              "e2": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]},
              "f4": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + bytes(12))
    with safe_open(str(file), "np"):
        pass
    entries = read_header(file)
    assert {name: (e.start - 8 - len(text), e.nbytes, e.dtype, e.shape) for name, e in entries.items()} == {
        "z": (4, 8, "F32", (2,)), "e1": (0, 0, "BF16", (0, 3)), "e2": (0, 0, "I64", (0,)), "f4": (0, 4, "F4", (2, 4))}


def test_train_expanded_resume_refusals_name_the_flags(tmp_path, capsys):
    """A resume with another --lr, --weight-decay, --warmup-steps, --dtype, --precision, --batch-size, --seed,
    --train-blocks, fewer --steps than done, or (on token shards) another --seq-len or --data was refused in the
    library's terms: fit's "optimizer param group 0 peak_lr", "past steps=5 ... (resume=PATH)", Batches' and
    TokenShards' "the checkpoint's data had batch_size=4", the optimizer's "before fit is called (e.g. when
    kt.latest_checkpoint(out_dir) ...)", with Python advice (kpro.load_pretrained) that a command's user cannot
    follow. Each is refused naming --out and the flag, with the run's value and this call's."""
    alphabet = "abcdefgh \n"
    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=3 + len(alphabet), max_position_embeddings=32)
    kpro.CharTokenizer(alphabet).save(tmp_path / "src")
    big = tmp_path / "big"
    assert main(["expand", str(tmp_path / "src"), str(big), "--blocks", "1", "--position", "top"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    shards = tmp_path / "shards"
    assert main(["tokenize", "--tokenizer", str(big), "--data", str(corpus), "--out", str(shards),
                 "--workers", "1"]) == 0
    text_run, shard_run = tmp_path / "text-run", tmp_path / "shard-run"
    flags = ["--seq-len", "16", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--save-every", "2"]

    def refusal(run, data, *extra):
        capsys.readouterr()
        assert main(["train-expanded", str(big), "--out", str(run), "--data", str(data), *flags, *extra]) == 1
        err = capsys.readouterr().err
        err = err[err.index("error: "):]  # after the status lines
        for python in ("resume=PATH", "kt.latest_checkpoint", "kpro.load_pretrained", "peak_lr", "batch_size=",
                       "seq_len=", "param_dtypes", "steps="):
            assert python not in err, err
        return err

    assert main(["train-expanded", str(big), "--out", str(text_run), "--data", str(corpus), *flags, "--steps", "4"]) == 0
    assert main(["train-expanded", str(big), "--out", str(shard_run), "--data", str(shards), *flags,
                 "--steps", "4"]) == 0
    settings = f"error: --out {text_run} holds a run trained with other settings than these flags:\n  "
    fix = "\nresume with the run's flags, or pass another --out for a new run\n"
    for change, line in ((["--lr", "1e-3"], "--lr: 0.01 in the run, 0.001 now"),
                         (["--weight-decay", "0.1"], "--weight-decay: 0.0 in the run, 0.1 now"),
                         (["--warmup-steps", "2"], "--warmup-steps: 1 in the run, 2 now"),
                         (["--dtype", "float64"], "--dtype: float32 in the run, float64 now"),
                         (["--precision", "bf16"], "--precision: fp32 in the run, bf16 now (auto: bf16 on a GPU, "
                                                   "fp32 on the CPU)")):
        assert refusal(text_run, corpus, "--steps", "5", *change) == settings + line + fix
    for flag, value in (("--batch-size", "8"), ("--seed", "1")):
        had = {"--batch-size": 4, "--seed": 0}[flag]
        assert refusal(text_run, corpus, "--steps", "5", flag, value) == (
            f"error: --out {text_run} holds a run trained with {flag} {had}, and this one asks for {flag} {value}: "
            "resume with the run's, or pass another --out for a new run\n")
    assert refusal(text_run, corpus, "--steps", "5", "--train-blocks", "1") == (
        f"error: --out {text_run} holds a run that trained blocks 2, and --train-blocks 1 trains blocks 1: resume "
        "with the run's blocks (--train-blocks 2), or pass another --out for a new run\n")
    assert refusal(text_run, corpus, "--steps", "3") == (
        f"error: --out {text_run} holds a run at step 4, past --steps 3: pass --steps 4 or more to continue it "
        "(--steps 4: it is done), or another --out for a new run\n")
    assert refusal(shard_run, shards, "--steps", "5", "--seq-len", "8") == (
        f"error: --out {shard_run} holds a run trained with --seq-len 16, and this one asks for --seq-len 8: "
        "resume with the run's, or pass another --out for a new run\n")
    assert refusal(shard_run, corpus, "--steps", "5") == (
        f"error: --out {shard_run} holds a run trained on a token shard directory, and --data {corpus} is text "
        "files: resume with the run's --data, or pass another --out for a new run\n")
    assert refusal(text_run, shards, "--steps", "5") == (
        f"error: --out {text_run} holds a run trained on text files, and --data {shards} is a token shard "
        "directory: resume with the run's --data, or pass another --out for a new run\n")
    other = tmp_path / "other-shards"
    (tmp_path / "other.txt").write_text("\n\n".join("bca efd hg " * (i % 4 + 1) for i in range(40)))
    assert main(["tokenize", "--tokenizer", str(big), "--data", str(tmp_path / "other.txt"), "--out", str(other),
                 "--workers", "1"]) == 0
    assert refusal(shard_run, other, "--steps", "5") == (
        f"error: --out {shard_run} holds a run trained on other token shards than --data {other} (another corpus, "
        "tokenizer, or shards cut otherwise): resume with the run's --data, or pass another --out for a new run\n")
    assert main(["train-expanded", str(big), "--out", str(text_run), "--data", str(corpus), *flags, "--steps", "5"]) == 0


def test_train_expanded_saves_checkpoints_without_the_frozen_blocks_on_request(tmp_path, capsys):
    """--no-save-frozen: a checkpoint holds the new block (and the optimizer state), not the frozen source blocks,
    the embedding or the head; the run resumes exactly as one saving whole checkpoints does, and its final model is
    whole."""
    alphabet = "abcdefgh \n"
    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=3 + len(alphabet), max_position_embeddings=32)
    kpro.CharTokenizer(alphabet).save(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    args = ["train-expanded", str(tmp_path / "big"), "--data", str(corpus), "--seq-len", "16", "--batch-size", "4",
            "--lr", "1e-2", "--save-every", "2", "--device", "cpu"]
    for steps in ("2", "4"):  # the same run, extended (its cosine schedule over 2 steps, then over 4)
        assert main(args + ["--out", str(tmp_path / "whole"), "--steps", steps]) == 0
    assert main(args + ["--out", str(tmp_path / "lean"), "--steps", "2", "--no-save-frozen"]) == 0
    saved = load_file(tmp_path / "lean" / "step-00000002" / "module.safetensors")
    assert saved and all(name.startswith("layers.2.") for name in saved)
    assert main(args + ["--out", str(tmp_path / "lean"), "--steps", "4", "--no-save-frozen"]) == 0  # resumed
    assert "resumed from" in capsys.readouterr().err
    assert [m["loss"] for m in read_metrics(tmp_path / "lean" / "metrics.jsonl")] == \
        [m["loss"] for m in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    whole, lean = (kpro.load_pretrained(tmp_path / name / "final") for name in ("whole", "lean"))
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), lean.state_dict().values()))


def _model_flags(tmp_path, **given):
    from kpro.expansion.command import check_model_flags
    if not (tmp_path / "ck").exists():
        kpro.save_pretrained(kpro.Llama(tiny_config()), tmp_path / "ck")
    check_model_flags(argparse.Namespace(**{"dir": str(tmp_path / "ck"), "seq_len": None, "train_blocks": None,
                                            **given}))


# Mutation round 12
def test_seq_len_may_equal_max_position_embeddings(tmp_path):
    positions = tiny_config().max_position_embeddings
    _model_flags(tmp_path, seq_len=positions)
    with pytest.raises(ValueError, match=f"--seq-len {positions + 1} exceeds the model's max_position_embeddings "
                                         f"\\({positions}\\): pass --seq-len {positions} or less"):
        _model_flags(tmp_path, seq_len=positions + 1)


# Mutation round 12
def test_train_blocks_past_the_last_block_is_refused(tmp_path):
    blocks = tiny_config().num_hidden_layers
    _model_flags(tmp_path, train_blocks=[0, blocks - 1])
    with pytest.raises(ValueError, match=f"block index {blocks} is out of range: the model has {blocks} blocks "
                                         f"\\(0 ... {blocks - 1}\\)"):
        _model_flags(tmp_path, train_blocks=[0, blocks])


# Mutation round 12
def test_the_resume_hint_names_train_blocks_only_where_the_run_trained_blocks_alone(tmp_path):
    from kpro.errors import OtherParameters
    from kpro.expansion.command import _other_blocks
    args = argparse.Namespace(train_blocks=[1], dir="ck")
    blocks_only = _other_blocks(OtherParameters("", ["layers.2.mlp.up_proj.weight"], ["layers.1.mlp.up_proj.weight"]),
                                args, tmp_path)
    assert "resume with the run's blocks (--train-blocks 2), or" in str(blocks_only)
    with_head = _other_blocks(OtherParameters("", ["layers.2.mlp.up_proj.weight", "lm_head.weight"],
                                              ["layers.1.mlp.up_proj.weight"]), args, tmp_path)
    assert str(with_head) == (f"--out {tmp_path} holds a run that trained blocks 2, lm_head.weight, and --train-blocks "
                              "1 trains blocks 1: resume with the run's blocks, or pass another --out for a new run")


# Mutation round 12
def test_a_corpus_of_exactly_one_batch_of_rows_trains(tmp_path):
    """a corpus that packs into exactly `batch_size` rows fills one batch (refused only when fewer)."""
    from kpro.expansion.posttrain import corpus_batches, corpus_rows, read_corpus
    tok = kpro.CharTokenizer("abcdefgh ")
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcd efgh\n\nabc\n\nhgfe dcba\n")
    rows = len(corpus_rows(read_corpus([corpus]), tok, 8))
    assert rows >= 2
    assert len(corpus_batches([corpus], tok, tmp_path, 8, rows, seed=0).examples) == rows
    with pytest.raises(ValueError, match=f"fewer than one batch of {rows + 1}"):
        corpus_batches([corpus], tok, tmp_path, 8, rows + 1, seed=0)


def test_train_expanded_uses_llama_pros_adamw_betas(tmp_path, monkeypatch):
    """LLaMA Pro post-pretrains with AdamW betas (0.9, 0.95); (0.9, 0.999) trained every other test the same."""
    from kpro.expansion import posttrain

    write_checkpoint(tmp_path / "src", num_hidden_layers=2, vocab_size=13)
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    expand_checkpoint(tmp_path / "src", tmp_path / "big", 1, "top")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    seen = {}

    class Stop(Exception):
        pass

    def fake_fit(model, batches, out_dir, *, optimizer, **kwargs):
        seen["betas"] = optimizer(model).param_groups[0]["betas"]
        raise Stop
    monkeypatch.setattr(posttrain, "fit", fake_fit)
    with pytest.raises(Stop):
        train_expanded(tmp_path / "big", corpus, tmp_path / "run", steps=1, seq_len=16, batch_size=4)
    assert tuple(seen["betas"]) == (0.9, 0.95)
