"""fit(save_frozen=False): checkpoints without the frozen weights (a LoRA or Bitune base), resumed exactly onto
the model the run started from, and refused, by name, onto any other."""
import hashlib
import random

import pytest
import torch
from safetensors.torch import load_file

import kpro
import kpro._digests
from kpro import train as kt
from kpro._files import save_safetensors
from kpro.train import checkpointing

from conftest import tiny_config
from test_train_fit import StopAt, batches, losses, make_model as base, one_thread  # noqa: F401 (an autouse fixture)


def adapted(base_seed=0, adapter_seed=0):
    model = base(base_seed)
    kpro.lora.add_adapters(model, ["a"], rank=2, seed=adapter_seed)
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter from the first step
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(adapter_seed))
    return model


def train(model, out, stop=None, steps=6, **kwargs):
    callbacks = [] if stop is None else [StopAt(stop)]
    with kpro.lora.active(model, "a"):
        return kt.fit(model, batches(), out, steps=steps, lr=1e-2, callbacks=callbacks, save_frozen=False, **kwargs)


def frozen_names(model):
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def test_a_checkpoint_holds_the_adapters_and_digests_of_the_base(tmp_path):
    model = adapted()
    train(model, tmp_path, steps=2)
    saved = load_file(tmp_path / "step-00000002" / "module.safetensors")
    frozen = frozen_names(model)
    assert frozen and not frozen & set(saved)  # the base weights are left out ...
    assert set(saved) == set(model.state_dict()) - frozen  # ... and nothing else: the adapters, buffers
    assert all(".lora_" in name for name in saved if name in dict(model.named_parameters()))
    state = checkpointing._read_state(tmp_path / "step-00000002")
    assert set(state[checkpointing.FROZEN_DIGESTS]) == frozen
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items() if name in saved)


def test_a_run_resumed_onto_its_base_equals_the_run_in_one_go(tmp_path):
    """The resumed model starts from other adapters (seed 5), which the checkpoint replaces, and from its base,
    which the checkpoint does not hold: every weight and loss must still be the straight run's."""
    straight = adapted()
    train(straight, tmp_path / "a")
    train(adapted(), tmp_path / "b", stop=3)
    resumed = adapted(adapter_seed=5)
    run = train(resumed, tmp_path / "b")
    assert run.step == 6 and losses(tmp_path / "a") == losses(tmp_path / "b")
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_resume_onto_another_base_is_refused_by_name_and_loads_nothing(tmp_path):
    train(adapted(), tmp_path, stop=3)
    other = adapted(adapter_seed=5)
    with torch.no_grad():
        other.layers[1].mlp.up_proj.weight[3, 4] += 1e-3  # one value of one frozen tensor
    before = {name: t.clone() for name, t in other.state_dict().items()}
    with pytest.raises(kpro.CheckpointError, match=r"differ from the run's in layers\.1\.mlp\.up_proj\.weight: "
                                                   r"resume onto the model the run started from"):
        train(other, tmp_path)
    assert all(torch.equal(t, before[name]) for name, t in other.state_dict().items())  # adapters not loaded either


def test_a_resume_onto_the_base_in_another_dtype_is_refused(tmp_path):
    """The same values in float64: the digests cover the dtype, and fit's settings name it first."""
    train(adapted(), tmp_path, stop=3)
    other = adapted()
    other.to(torch.float64)
    with pytest.raises(kpro.CheckpointError, match=r"param_dtypes: 'float32' in the checkpoint, 'float64' now"):
        train(other, tmp_path)
    state = checkpointing._read_state(tmp_path / "step-00000003")
    frozen = {name: t for name, t in adapted().state_dict().items() if name in state[checkpointing.FROZEN_DIGESTS]}
    assert kpro._digests.value_digests(frozen) == state[checkpointing.FROZEN_DIGESTS]
    doubled = kpro._digests.value_digests({name: t.double() for name, t in frozen.items()})
    assert all(doubled[name] != digest for name, digest in state[checkpointing.FROZEN_DIGESTS].items())


def test_a_checkpoint_missing_a_trained_tensor_is_refused(tmp_path):
    """The file holds the trained weights alone, so the resume loads it leniently: a tensor it lacks that is not a
    frozen one it left out would silently keep the model's value."""
    train(adapted(), tmp_path, stop=3)
    path = tmp_path / "step-00000003" / "module.safetensors"
    saved = load_file(path)
    name = next(name for name in saved if ".lora_A." in name)
    del saved[name]
    save_safetensors(saved, path, metadata={"format": "pt", "aliases": "{}"})
    with pytest.raises(kpro.CheckpointError, match=rf"the weights file does not hold its model's weights \(edited, or "
                                                   rf"written by something else\): it lacks {name.replace('.', '[.]')}"):
        train(adapted(), tmp_path)


def test_a_llama_with_frozen_blocks_saves_and_resumes_without_them(tmp_path):
    """A plain Llama (HF layout when saved whole) with frozen blocks: its checkpoints hold the trained weights alone
    as module.safetensors, and the run resumes exactly."""
    def frozen_first_block(seed=0):
        model = base(seed)
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(("layers.0.", "embed_tokens.")))
        return model

    def fit(model, out, stop=None):
        callbacks = [] if stop is None else [StopAt(stop)]
        return kt.fit(model, batches(), out, steps=6, lr=1e-2, callbacks=callbacks, save_frozen=False)
    straight = frozen_first_block()
    fit(straight, tmp_path / "a")
    fit(frozen_first_block(), tmp_path / "b", stop=3)
    checkpoint = tmp_path / "b" / "step-00000003"
    assert not (checkpoint / "model.safetensors").exists()
    assert not any(name.startswith(("layers.0.", "embed_tokens.")) for name in load_file(checkpoint / "module.safetensors"))
    resumed = frozen_first_block()
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            if p.requires_grad:
                p.add_(1.0)  # the checkpoint must replace every trained weight
    fit(resumed, tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_a_whole_checkpoint_still_resumes_with_save_frozen_false(tmp_path):
    """Checkpoints saved whole (the default, and every one before save_frozen) replace the frozen weights too."""
    straight = adapted()
    train(straight, tmp_path / "a")
    with kpro.lora.active(first := adapted(), "a"):
        kt.fit(first, batches(), tmp_path / "b", steps=6, lr=1e-2, callbacks=[StopAt(3)])
    assert checkpointing.FROZEN_DIGESTS not in checkpointing._read_state(tmp_path / "b" / "step-00000003")
    resumed = adapted(base_seed=7, adapter_seed=5)  # another base: the whole checkpoint replaces it
    train(resumed, tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


@pytest.mark.parametrize("value", [0, "no", None])
def test_save_frozen_must_be_a_bool(tmp_path, value):
    with pytest.raises(TypeError, match="save_frozen must be True or False"):
        kt.fit(adapted(), batches(), tmp_path / "fit", steps=1, lr=1e-2, save_frozen=value)
    assert not (tmp_path / "fit").exists()
    model = adapted()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(TypeError, match="save_frozen must be True or False"):
        kt.save_checkpoint(tmp_path / "save", 1, model, optimizer, save_frozen=value)


class FreezeBlock0At(kt.Callback):
    """Block 0 trains until `step`, then is frozen (run.reset_optimizer(), as docs/training.md describes)."""

    def __init__(self, step=2):
        self.step = step

    def on_step_end(self, run, metrics):
        if run.step == self.step:
            for p in run.model.layers[0].parameters():
                p.requires_grad_(False)
            run.reset_optimizer()


def test_a_block_trained_then_frozen_mid_run_is_saved_and_the_run_resumes_exactly(tmp_path):
    """What a checkpoint left out was decided by requires_grad at the save: block 0, trained for two steps and then
    frozen, was in no checkpoint (a digest of its trained values alone), and the resume onto the model the run
    started from was refused. Only the frozen weights unchanged since the run started are left out now."""
    def fit(model, out, callbacks):
        return kt.fit(model, batches(), out, steps=6, lr=1e-2, callbacks=callbacks, save_frozen=False)

    def embedding_frozen():
        model = base()
        model.embed_tokens.weight.requires_grad_(False)
        return model
    straight = embedding_frozen()
    fit(straight, tmp_path / "a", [FreezeBlock0At()])
    first = embedding_frozen()
    fit(first, tmp_path / "b", [FreezeBlock0At(), StopAt(4)])
    saved = load_file(tmp_path / "b" / "step-00000004" / "module.safetensors")
    assert set(saved) == set(first.state_dict()) - {"embed_tokens.weight"}  # block 0 in it, frozen or not
    resumed = embedding_frozen()
    for p in resumed.layers[0].parameters():  # as the run is at step 4
        p.requires_grad_(False)
    fit(resumed, tmp_path / "b", [FreezeBlock0At()])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_an_adapter_merged_mid_run_is_saved_and_the_run_resumes_exactly(tmp_path):
    """Merging layer 0's trained adapters changes frozen base weights (and freezes the adapters): they are saved."""
    class MergeAt(kt.Callback):
        def on_step_end(self, run, metrics):
            if run.step == 2:
                for layer in kpro.lora.lora_layers(run.model.layers[0]):
                    layer.merge("a")
                run.reset_optimizer()
    straight = adapted()
    with kpro.lora.active(straight, "a"):
        kt.fit(straight, batches(), tmp_path / "a", steps=6, lr=1e-2, callbacks=[MergeAt()], save_frozen=False)
    with kpro.lora.active(first := adapted(), "a"):
        kt.fit(first, batches(), tmp_path / "b", steps=6, lr=1e-2, callbacks=[MergeAt(), StopAt(4)], save_frozen=False)
    saved = load_file(tmp_path / "b" / "step-00000004" / "module.safetensors")
    assert "layers.0.self_attn.q_proj.weight" in saved and "layers.1.self_attn.q_proj.weight" not in saved
    resumed = adapted()
    for layer in kpro.lora.lora_layers(resumed.layers[0]):  # merged as the run is at step 4 (its values replaced)
        layer.merge("a")
    with kpro.lora.active(resumed, "a"):
        kt.fit(resumed, batches(), tmp_path / "b", steps=6, lr=1e-2, save_frozen=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_a_resume_onto_a_model_of_another_config_is_refused_without_a_config_json(tmp_path):
    """A checkpoint saved as module.safetensors (without the frozen weights, or a LoRA or Bitune model at any time)
    has no config.json, and fit compared the config only through it: a resume onto the same weights under another
    rope_theta or rms_norm_eps trained on. The Llama's config is recorded in trainer_state.pt now."""
    from kpro.bitune.training import tune
    train(adapted(), tmp_path / "fit", stop=3)
    other = base()
    other.config = other.config.replace(rope_theta=10000.0, rms_norm_eps=1e-3)
    kpro.lora.add_adapters(other, ["a"], rank=2, seed=0)
    with pytest.raises(kpro.CheckpointError, match=r"was saved from a different model:\n  rms_norm_eps=1e-0?5 there, "
                                                   r"0\.001 here\n  rope_theta=500\.0 there, 10000\.0 here"):
        train(other, tmp_path / "fit")
    rng = random.Random(0)
    pairs = [([1] + [rng.randrange(3, 67) for _ in range(4)], [rng.randrange(3, 67) for _ in range(3)] + [2])
             for _ in range(20)]
    tune(base(), pairs, "lora", tmp_path / "tune", steps=2, batch_size=4)
    moved = base()
    moved.config = moved.config.replace(rope_theta=10000.0)
    with pytest.raises(kpro.CheckpointError, match=r"rope_theta=500\.0 there, 10000\.0 here"):
        tune(moved, pairs, "lora", tmp_path / "tune", steps=4, batch_size=4)


def test_a_resume_onto_a_base_differing_in_its_last_value_is_refused(tmp_path):
    """The digest covers every element: a frozen tensor differing only in its last value is another base; and a
    tensor hashed in several pieces (PIECE elements each) counts the last element of each."""
    train(adapted(), tmp_path, stop=3)
    other = adapted()
    with torch.no_grad():
        other.layers[1].mlp.up_proj.weight.view(-1)[-1] += 1e-3
    with pytest.raises(kpro.CheckpointError, match=r"differ from the run's in layers\.1\.mlp\.up_proj\.weight"):
        train(other, tmp_path)
    a = torch.zeros(kpro._digests.PIECE + 2, dtype=torch.uint8)  # 16 MB: SmolLM2's embedding holds 28M values
    for index in (kpro._digests.PIECE - 1, -1):
        b = a.clone()
        b[index] = 1
        assert kpro._digests.value_digests({"w": a}) != kpro._digests.value_digests({"w": b}), index


def test_a_tied_frozen_embedding_is_left_out_under_both_its_names(tmp_path):
    """A tied base (SmolLM2's): the frozen embedding is also lm_head.weight, and neither name is saved."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(tie_word_embeddings=True))
    kpro.lora.add_adapters(model, ["a"], rank=2, seed=0)
    assert model.lm_head.weight is model.embed_tokens.weight
    train(model, tmp_path, steps=2)
    saved = load_file(tmp_path / "step-00000002" / "module.safetensors")
    assert "lm_head.weight" not in saved and "embed_tokens.weight" not in saved
    digests = checkpointing._read_state(tmp_path / "step-00000002")[checkpointing.FROZEN_DIGESTS]
    assert {"lm_head.weight", "embed_tokens.weight"} <= set(digests)


def test_save_checkpoint_in_a_loop_of_ones_own_leaves_out_the_frozen_weights_unchanged_since_its_start(tmp_path):
    model = adapted()
    at_start = checkpointing.frozen_digests(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.add_(1.0)  # frozen, but changed (a merge, say)
    kt.save_checkpoint(tmp_path, 1, model, optimizer, save_frozen=False, frozen_at_start=at_start)
    saved = load_file(tmp_path / "step-00000001" / "module.safetensors")
    assert "layers.0.mlp.up_proj.weight" in saved and "layers.1.mlp.up_proj.weight" not in saved
    kt.save_checkpoint(tmp_path, 2, model, optimizer, save_frozen=False)  # without it: every frozen one left out
    assert "layers.0.mlp.up_proj.weight" not in load_file(tmp_path / "step-00000002" / "module.safetensors")
    with pytest.raises(TypeError, match="frozen_at_start must be a dict of digests"):
        kt.save_checkpoint(tmp_path, 3, model, optimizer, frozen_at_start=at_start)  # with save_frozen=True
    with pytest.raises(TypeError, match="frozen_at_start must be a dict of digests"):
        kt.save_checkpoint(tmp_path, 3, model, optimizer, save_frozen=False, frozen_at_start=["x"])
    assert not (tmp_path / "step-00000003").exists()


@pytest.mark.parametrize("first", [True, False])
def test_a_block_trained_then_frozen_in_a_session_saved_whole_stays_saved_after(tmp_path, first):
    """Sessions saving whole (save_frozen=True) and without the frozen weights, mixed: a session that resumed a
    whole checkpoint took the weights it had loaded for the run's start, so block 0, trained and then frozen in a
    session before, was left out from then on (keep_last had pruned the whole one) and the next resume refused."""
    def session(out, save_frozen, stop=None, block_0_frozen=False):
        model = base()
        model.embed_tokens.weight.requires_grad_(False)
        for p in model.layers[0].parameters() if block_0_frozen else ():
            p.requires_grad_(False)
        kt.fit(model, batches(), out, steps=8, lr=1e-2, save_frozen=save_frozen, keep_last=1,
               callbacks=[FreezeBlock0At(3)] + ([StopAt(stop)] if stop else []))
        return model
    straight = session(tmp_path / "a", False)
    session(tmp_path / "b", first, stop=4)
    session(tmp_path / "b", not first, stop=5, block_0_frozen=True)
    session(tmp_path / "b", first, stop=6, block_0_frozen=True)
    resumed = session(tmp_path / "b", not first, block_0_frozen=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_loading_a_checkpoint_saved_without_its_frozen_weights_says_what_it_is(tmp_path, capsys):
    """load_pretrained and `kpro info` said only "no config.json" of a checkpoint saved as a module's state dict."""
    model = base()
    model.embed_tokens.weight.requires_grad_(False)
    kt.fit(model, batches(), tmp_path, steps=1, lr=1e-2, save_frozen=False)
    message = r"step-00000001 is a training checkpoint holding a module's state dict \(module\.safetensors: "
    with pytest.raises(kpro.CheckpointError, match=message + r".*load the run's final model"):
        kpro.load_pretrained(tmp_path / "step-00000001")
    from kpro.cli import main
    assert main(["info", str(tmp_path / "step-00000001")]) == 1
    assert "is a training checkpoint holding a module's state dict" in capsys.readouterr().err


# Mutation round 13: the digests' content (name, dtype, shape, every byte) and format
def _reference(name, t):  # the documented content: name, dtype, shape and bytes, 16 hex digits
    h = hashlib.sha256(f"{name}:{t.dtype}{list(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def test_value_digests_cover_shape_and_dtype_and_match_a_direct_sha256():
    t = torch.arange(6, dtype=torch.int32)
    same_bytes = {"shape": t.reshape(2, 3), "other shape": t.reshape(3, 2), "dtype": t.view(torch.float32)}
    got = {k: kpro._digests.value_digests({"w": v})["w"] for k, v in same_bytes.items()}
    assert len(set(got.values())) == 3, got  # D1: shape dropped; D2: dtype dropped
    for k, v in same_bytes.items():
        assert got[k] == _reference("w", v)  # D5: 12 hex digits
        assert len(got[k]) == len("sha256:") + 16


def test_value_digests_hash_the_last_element_of_a_tensor_one_past_a_piece_is_hashed():
    a = torch.zeros(kpro._digests.PIECE + 1, dtype=torch.uint8)
    b = a.clone()
    b[-1] = 1
    assert kpro._digests.value_digests({"w": a}) != kpro._digests.value_digests({"w": b})
