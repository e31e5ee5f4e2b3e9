"""Bitune: the fused path against the three-pass reference, batching, the definitions of the ablations
(checked against plain cached decoding of the model), generation, adapter files, bad input."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kpro
from kpro import lora
from kpro.bitune import Bitune, Streams, right_pad, split_streams
from conftest import backend_devices, randomize_norms, relative_error, tiny_config

ROWS = [(9, 4), (5, 1), (12, 7), (6, 5)]  # (sequence length, prompt length P): P = 1 and P = len − 1 included


def make(mode="bitune", dtype=torch.float64, seed=0, random_adapters=True, w=(0.02, -0.005), device="cpu"):
    torch.manual_seed(seed)
    model = kpro.Llama(tiny_config()).to(dtype)
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    bt = Bitune(model, rank=4, alpha=2.0, mode=mode, seed=seed).to(device=device)
    model.to(device=device, dtype=dtype)
    with torch.no_grad():
        if random_adapters:
            gen = torch.Generator().manual_seed(seed + 2)
            for name, p in bt.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        bt.w_k.copy_(torch.tensor(w[:1] * 2 if len(w) == 1 else w, dtype=torch.float32))
        bt.w_v.copy_(torch.tensor(tuple(reversed(w)) if len(w) > 1 else w * 2, dtype=torch.float32))
    return bt


def batch(device="cpu", rows=ROWS, seed=3):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 67, (n,), generator=gen).tolist() for n, _ in rows]
    ids, lens = right_pad(seqs, 0, device=device)
    mask = (torch.arange(ids.shape[1], device=device) < lens[:, None]).long()
    return ids, torch.tensor([p for _, p in rows], device=device), mask, seqs


def answer_logits(bt, ids, plens, mask, **kw):
    """Logits of the real answer-stream positions only (padding positions are undefined)."""
    logits = bt(ids, plens, mask, **kw)
    answer_lens = mask.sum(1) - plens + 1
    return torch.cat([logits[row, :n] for row, n in enumerate(answer_lens.tolist())])


def trainable(bt):
    return [(n, p) for n, p in bt.named_parameters() if p.requires_grad]


def loss_and_grads(bt, ids, plens, mask, fused):
    loss = bt.loss(ids, plens, mask, fused=fused)
    params = [p for _, p in trainable(bt)]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:3])
@pytest.mark.parametrize("mode", ["bitune", "shared_weights"])
def test_fused_path_equals_three_passes(backend, device, mode):
    bt = make(mode, dtype=torch.float32, device=device)
    ids, plens, mask, _ = batch(device)
    with kpro.ops.backend(backend, rms_norm="torch", swiglu="torch"):
        fused_loss, fused_grads = loss_and_grads(bt, ids, plens, mask, fused=True)
    with kpro.ops.backend("torch"):
        ref_loss, ref_grads = loss_and_grads(bt, ids, plens, mask, fused=False)
    assert relative_error(fused_loss, ref_loss) <= 1e-5
    names = [n for n, _ in trainable(bt)]
    for name, got, expected in zip(names, fused_grads, ref_grads):
        assert relative_error(got, expected, floor=1e-7) <= 1e-5, name
    assert sum(g.abs().sum() > 0 for g in ref_grads) >= len(ref_grads) - 10  # only the last layer's unused tail is 0


def test_batched_equals_one_by_one():
    bt = make()
    ids, plens, mask, seqs = batch()
    logits = bt(ids, plens, mask)
    for row, (seq, p) in enumerate(zip(seqs, plens.tolist())):
        alone = bt(torch.tensor([seq]), torch.tensor([p]))[0]
        answer_len = len(seq) - p + 1
        assert relative_error(logits[row, :answer_len], alone[:answer_len]) <= 1e-12
    total = bt.loss(ids, plens, mask) * sum(len(s) - p for s, p in zip(seqs, plens.tolist()))
    parts = sum(bt.loss(torch.tensor([s]), torch.tensor([p])) * (len(s) - p) for s, p in zip(seqs, plens.tolist()))
    assert relative_error(total, parts) <= 1e-12


def causal_decoding_logits(model, seq, p, prompt_adapter="causal"):
    """Plain cached decoding of the model: prompt[:P-1] with one adapter, then the answer stream with the
    causal adapter. This is the definition of every mode whose prompt cache comes from a causal pass."""
    cache = kpro.KVCache(model.config, 1, len(seq), torch.float64)
    if p > 1:
        with lora.active(model, prompt_adapter):
            model(torch.tensor([seq[:p - 1]]), cache=cache)
    with lora.active(model, "causal"):
        return model(torch.tensor([seq[p - 1:]]), cache=cache)[0]


@pytest.mark.parametrize("mode", ["bitune", "shared_weights", "only_causal"])
def test_alpha_zero_reads_the_prompt_causally_with_the_causal_adapter(mode):
    bt = make(mode, w=(0.0,))
    ids, plens, mask, seqs = batch()
    logits = bt(ids, plens, mask, fused=False)
    for row, (seq, p) in enumerate(zip(seqs, plens.tolist())):
        expected = causal_decoding_logits(bt.model, seq, p)
        assert relative_error(logits[row, :len(seq) - p + 1], expected) <= 1e-12


def test_mixing_weights_follow_the_formula_and_start_at_one_half():
    bt = make(w=(0.02, -0.005))
    alpha_k, alpha_v = bt.mix_weights()
    torch.testing.assert_close(alpha_k, torch.tensor([2 / 3, 1 / 3]), rtol=1e-6, atol=0)  # |w| / (|w| + 0.01)
    torch.testing.assert_close(alpha_v, torch.tensor([1 / 3, 2 / 3]), rtol=1e-6, atol=0)
    default = Bitune(kpro.Llama(tiny_config()))
    assert default.rank == 8 and default.alpha == 1.0 and default.mix_eps == 0.01
    assert all(torch.equal(a, torch.full((2,), 0.5)) for a in default.mix_weights())
    assert default.w_k.dtype == torch.float32
    with torch.no_grad():  # trained values bf16 cannot hold: the cast must not round them on the way
        default.w_k.copy_(torch.tensor([0.7342197, -1.0001]))
        default.w_v.copy_(torch.tensor([1e-3 + 1e-7, 3.1415927]))
    w_k, w_v = default.w_k.detach().clone(), default.w_v.detach().clone()
    default.w_k.grad = torch.tensor([0.1234567, -2.0001])  # and their gradients, kept as they are
    default.to(torch.bfloat16)
    assert default.w_k.dtype == default.w_v.dtype == torch.float32  # the model moves, the mixing scalars stay fp32
    assert torch.equal(default.w_k, w_k) and torch.equal(default.w_v, w_v)
    assert torch.equal(default.w_k.grad, torch.tensor([0.1234567, -2.0001]))
    assert default.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert default.model.layers[0].self_attn.q_proj.causal.lora_A.weight.dtype == torch.float32
    assert kpro.Bitune is Bitune


def test_mixing_scalars_are_made_where_the_model_is():
    """w_k and w_v were made on the CPU whatever the model's device, so a model on a GPU needed a bt.to(device)."""
    with torch.device("meta"):
        model = kpro.Llama(tiny_config())
    bt = Bitune(model)
    assert bt.w_k.device.type == bt.w_v.device.type == "meta"


@pytest.mark.parametrize("fused", [True, False])
def test_fresh_adapters_and_zero_weights_give_the_base_model(fused):
    bt = make(random_adapters=False, w=(0.0,))
    ids, plens, mask, seqs = batch()
    logits = bt(ids, plens, mask, fused=fused)
    with lora.active(bt.model, None):
        base = bt.model(ids, mask)
    for row, (seq, p) in enumerate(zip(seqs, plens.tolist())):
        assert relative_error(logits[row, :len(seq) - p + 1], base[row, p - 1:len(seq)]) <= 1e-12


def test_only_causal_at_alpha_one_reads_the_prompt_with_the_bidir_adapter_causally():
    bt = make("only_causal", w=(1e30,))
    assert torch.all(bt.mix_weights()[0] == 1)
    ids, plens, mask, seqs = batch()
    logits = bt(ids, plens, mask)
    for row, (seq, p) in enumerate(zip(seqs, plens.tolist())):
        expected = causal_decoding_logits(bt.model, seq, p, prompt_adapter="bidir")
        assert relative_error(logits[row, :len(seq) - p + 1], expected) <= 1e-12


def copy_adapter(bt_from, name_from, bt_to, name_to):
    src = dict(bt_from.named_parameters())
    with torch.no_grad():
        for name, p in bt_to.named_parameters():
            if f".{name_to}.lora_" in name:
                p.copy_(src[name.replace(f".{name_to}.lora_", f".{name_from}.lora_")])


def test_one_pass_modes_equal_the_mix_at_its_ends():
    """α = 1 takes the bidirectional pass's cache: bitune(α=1) = no_mix, shared_weights(α=1) = naive_bidir,
    and naive_bidir is no_mix with the causal adapter in the bidirectional pass."""
    ids, plens, mask, _ = batch()
    bitune = make("bitune", w=(1e30,))
    no_mix = make("no_mix")
    copy_adapter(bitune, "bidir", no_mix, "bidir")
    copy_adapter(bitune, "causal", no_mix, "causal")
    assert relative_error(answer_logits(no_mix, ids, plens, mask), answer_logits(bitune, ids, plens, mask)) <= 1e-12

    shared = make("shared_weights", w=(1e30,))
    naive = make("naive_bidir")
    copy_adapter(shared, "causal", naive, "causal")
    assert relative_error(answer_logits(naive, ids, plens, mask), answer_logits(shared, ids, plens, mask)) <= 1e-12
    copy_adapter(naive, "causal", no_mix, "bidir")
    copy_adapter(naive, "causal", no_mix, "causal")
    assert relative_error(answer_logits(no_mix, ids, plens, mask), answer_logits(naive, ids, plens, mask)) <= 1e-12


def test_one_pass_modes_do_not_use_the_mixing_weights():
    for mode in ("naive_bidir", "no_mix"):
        bt = make(mode)
        ids, plens, mask, _ = batch()
        bt.loss(ids, plens, mask).backward()
        assert bt.w_k.grad is None and bt.w_v.grad is None
    with pytest.raises(ValueError, match="no fused path"):
        bt.loss(ids, plens, mask, fused=True)


def test_gradients_reach_both_adapters_and_the_mixing_weights():
    bt = make(random_adapters=False, dtype=torch.float32)
    ids, plens, mask, _ = batch()
    bt.loss(ids, plens, mask).backward()
    grads = {n: p.grad for n, p in trainable(bt)}
    assert grads["w_k"][1:].abs().min() > 0 and grads["w_v"][1:].abs().min() > 0  # layer 0: both caches equal
    for adapter in ("bidir", "causal"):
        assert grads[f"model.layers.0.self_attn.k_proj.{adapter}.lora_B.weight"].abs().sum() > 0
        assert grads[f"model.layers.0.mlp.down_proj.{adapter}.lora_B.weight"].abs().sum() > 0
    frozen = [n for n, p in bt.named_parameters() if not p.requires_grad]
    assert "model.layers.0.self_attn.q_proj.weight" in frozen and "model.embed_tokens.weight" in frozen


@pytest.mark.parametrize("fused", [True, False])
def test_generation_starts_with_the_argmax_of_the_training_logits(fused):
    bt = make(dtype=torch.float64)
    ids, plens, mask, seqs = batch()
    logits = bt(ids, plens, mask)
    prompts = [seq[:p] for seq, p in zip(seqs, plens.tolist())]
    out = bt.generate(prompts, 6, fused=fused, eos_token_id=[])
    for row, tokens in enumerate(out):
        assert tokens[0] == int(logits[row, 0].argmax())
        assert len(tokens) == 6
    # and generation continues like scoring its own output: token t+1 is the argmax after token t
    seqs2 = [prompt + tokens for prompt, tokens in zip(prompts, out)]
    ids2, lens2 = right_pad(seqs2, 0)
    logits2 = bt(ids2, plens, (torch.arange(ids2.shape[1]) < lens2[:, None]).long())
    for row, tokens in enumerate(out):
        assert logits2[row, :6].argmax(-1).tolist() == tokens


def test_adapter_files_round_trip(tmp_path):
    bt = make(dtype=torch.float32)
    ids, plens, mask, _ = batch()
    before = bt.loss(ids, plens, mask)
    bt.save_adapters(tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config == {"method": "bitune", "rank": 4, "alpha": 2.0, "mix_eps": 0.01, "mode": "bitune", "adapters": ["bidir", "causal"],
                      "num_hidden_layers": 2, "base_model": kpro.adapters.base_fingerprint(bt.model, torch.float32),
                      "base_dtype": "float32", "base_model_narrower": {
                          name: kpro.adapters.base_fingerprint(bt.model, getattr(torch, name))
                          for name in ("bfloat16", "float16")}}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapters" / "adapters.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.down_proj.bidir.lora_B.weight" in names
    assert "model.layers.0.self_attn.q_proj.causal.lora_A.weight" in names and "model.layers.1.bitune.w_v" in names
    fresh = make(dtype=torch.float32, random_adapters=False, w=(0.5,))
    fresh.load_adapters(tmp_path / "adapters")
    assert torch.equal(fresh.loss(ids, plens, mask), before)
    again = Bitune.from_adapters(base_of_make(torch.float32), tmp_path / "adapters")
    assert again.mode == "bitune" and again.rank == 4
    assert torch.equal(again.loss(ids, plens, mask), before)


def test_numpy_rank_and_alpha_are_saved_as_json_numbers(tmp_path):
    """A NumPy rank was kept as given: save_adapters raised 'Object of type int64 is not JSON serializable'."""
    bt = Bitune(kpro.Llama(tiny_config()), rank=np.int64(2), alpha=np.float32(4))
    assert (type(bt.rank), type(bt.alpha)) == (int, float)
    bt.save_adapters(tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert (config["rank"], config["alpha"]) == (2, 4.0)
    for rank, alpha, message in ((np.int64(0), 1.0, "LoRA rank must be a positive integer"),
                                 (2, np.float32("nan"), "LoRA alpha must be a finite number other than 0")):
        with pytest.raises(ValueError, match=message):
            Bitune(kpro.Llama(tiny_config()), rank=rank, alpha=alpha)


def test_adapters_load_only_into_the_base_they_were_tuned_on(tmp_path):
    """Adapters loaded into any base of the same shape, silently: another checkpoint, or another seed of it.
    The base is recorded (a digest of its weights); a base of a wider dtype is compared in the tuned one's."""
    Bitune(base_of_make(torch.float32).to(torch.bfloat16), rank=4, seed=0).save_adapters(tmp_path / "a")
    other = base_of_make(torch.float32, seed=1).to(torch.bfloat16)
    before = {name: p.clone() for name, p in other.named_parameters()}
    with pytest.raises(kpro.CheckpointError, match=r"holds adapters tuned on another base model \(fingerprint "
                                                   r"sha256:\w+ in bfloat16, this model's sha256:\w+\): load the "
                                                   r"checkpoint they were tuned on"):
        Bitune.from_adapters(other, tmp_path / "a")
    assert not lora.lora_layers(other) and all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    # the tuned base in fp32: its values cast to bf16 are the tuned ones
    assert Bitune.from_adapters(base_of_make(torch.float32), tmp_path / "a").rank == 4


def test_adapters_refuse_a_base_that_differs_in_one_value(tmp_path):
    """The base digest sampled 16 evenly spaced values of each tensor: a base whose embedding row 5 differed (one
    token's vector retrained, say) took the adapters, in the tuned dtype and in a narrower one."""
    Bitune(base_of_make(torch.float32), rank=4, seed=0).save_adapters(tmp_path / "a")
    for dtype in (torch.float32, torch.bfloat16):
        other = base_of_make(torch.float32)
        with torch.no_grad():
            other.embed_tokens.weight[5, 3] += 0.25  # a change bf16 keeps too
        with pytest.raises(kpro.CheckpointError, match="holds adapters tuned on another base model"):
            Bitune.from_adapters(other.to(dtype), tmp_path / "a")
        assert Bitune.from_adapters(base_of_make(torch.float32).to(dtype), tmp_path / "a").rank == 4


def test_the_base_fingerprint_takes_a_tensor_of_over_2_24_values():
    """The sampled digest's float32 linspace rounded its last index past the end of SmolLM2-135M's embedding
    (49152 x 576): IndexError, so tune and save_adapters failed on every real checkpoint."""
    model = torch.nn.Embedding(49152, 576, dtype=torch.bfloat16)
    fingerprint = kpro.adapters.base_fingerprint(model)
    assert fingerprint.startswith("sha256:") and kpro.adapters.base_record(model)["base_model"] == fingerprint
    with torch.no_grad():
        model.weight[-1, -1] += 1
    assert kpro.adapters.base_fingerprint(model) != fingerprint


@torch.no_grad()
def sampled_fingerprint(model, dtype=None):
    """The base digest kpro recorded before it hashed every value, as it computed it (names, shapes and 16
    evenly spaced values of each tensor): adapter configs and tune checkpoints hold it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_A." in name or ".lora_B." in name:
            continue
        flat = tensor.detach().reshape(-1)
        index = torch.linspace(0, max(flat.numel() - 1, 0), min(16, flat.numel()), device=flat.device).long()
        values = flat[index].to(dtype or flat.dtype).to(torch.float64).cpu()
        digest.update(f"{name}{list(tensor.shape)}".encode() + values.numpy().tobytes())
    return digest.hexdigest()[:16]


def test_adapters_saved_with_the_sampled_base_digest_still_load_into_their_base(tmp_path):
    """Adapter files written before the digest covered every value record the sampled one: checked with it."""
    Bitune(base_of_make(torch.float32), rank=4, seed=0).save_adapters(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model"] = sampled_fingerprint(base_of_make(torch.float32), torch.float32)
    config["base_model_narrower"] = {name: sampled_fingerprint(base_of_make(torch.float32), getattr(torch, name))
                                     for name in ("bfloat16", "float16")}
    path.write_text(json.dumps(config))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):  # the tuned dtype, a wider one, a narrower one
        assert Bitune.from_adapters(base_of_make(torch.float32).to(dtype), tmp_path / "a").rank == 4
        with pytest.raises(kpro.CheckpointError, match="holds adapters tuned on another base model"):
            Bitune.from_adapters(base_of_make(torch.float32, seed=1).to(dtype), tmp_path / "a")


@pytest.mark.parametrize("tuned, loaded", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.float64, torch.float32), (torch.bfloat16, torch.float16),
                                           (torch.float16, torch.bfloat16)])
def test_adapters_tuned_on_a_wide_base_check_a_narrower_one(tmp_path, tuned, loaded):
    """A narrower copy of another base loaded adapters tuned in fp32 unchecked, and a float32 copy of the
    very base tuned in float64 was refused as another base (compared cast to float64). bf16 and fp16 are as
    wide as each other: adapters tuned on one loaded into any base in the other, unchecked."""
    Bitune(base_of_make(torch.float32).to(tuned), rank=4, seed=0).save_adapters(tmp_path / "a")
    assert Bitune.from_adapters(base_of_make(torch.float32).to(tuned).to(loaded), tmp_path / "a").rank == 4
    with pytest.raises(kpro.CheckpointError, match=fr"another base model, or a {str(loaded)[6:]} copy of it made by "
                                                   fr"another route, which rounds otherwise: cast the tuned base "
                                                   fr"\({str(tuned)[6:]}\) to {str(loaded)[6:]} \(fingerprint "
                                                   fr"sha256:\w+ in {str(loaded)[6:]}, "):
        Bitune.from_adapters(base_of_make(torch.float32, seed=1).to(tuned).to(loaded), tmp_path / "a")
    # a config written before the narrower fingerprints were recorded: the narrower base is not checked
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    del config["base_model_narrower"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    assert Bitune.from_adapters(base_of_make(torch.float32, seed=1).to(tuned).to(loaded), tmp_path / "a").rank == 4
    for config, message in (([1], "must hold a JSON object, got a list"), ({"method": "bitune"}, "lacks 'rank', 'alpha'")):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(kpro.CheckpointError, match=message):  # an AttributeError or KeyError before
            Bitune.from_adapters(base_of_make(torch.float32), tmp_path / "a")


def test_adapters_tuned_on_a_cast_of_a_half_precision_release_load_into_the_release(tmp_path):
    """Adapters tuned on the bf16 cast of an fp16 release (Llama 2's files) load back into the fp16 release, and
    the other way round; another base in that dtype is refused."""
    for release, tuned in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        Bitune(base_of_make(torch.float32).to(release).to(tuned), rank=4, seed=0).save_adapters(tmp_path / "a")
        assert Bitune.from_adapters(base_of_make(torch.float32).to(release), tmp_path / "a").rank == 4
        with pytest.raises(kpro.CheckpointError, match="holds adapters tuned on another base model"):
            Bitune.from_adapters(base_of_make(torch.float32, seed=1).to(release), tmp_path / "a")


def base_of_make(dtype, seed=0):
    """The plain model `make` puts adapters on."""
    torch.manual_seed(seed)
    model = kpro.Llama(tiny_config()).to(dtype)
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def test_adapter_files_that_do_not_fit(tmp_path):
    bt = make(dtype=torch.float32)
    bt.save_adapters(tmp_path / "a")
    other = make("no_mix", dtype=torch.float32)
    with pytest.raises(kpro.CheckpointError, match="mode saved 'bitune' here 'no_mix'"):
        other.load_adapters(tmp_path / "a")
    with pytest.raises(kpro.CheckpointError, match="holds no adapters"):
        bt.load_adapters(tmp_path / "missing")
    config = tmp_path / "a" / "adapter_config.json"
    config.write_bytes(config.read_text().replace('"bitune"', '"bitun\u00e9"', 1).encode("latin-1"))
    with pytest.raises(kpro.CheckpointError, match=r"adapter_config.json is not UTF-8 text"):  # a bare error before
        Bitune.from_adapters(base_of_make(torch.float32), tmp_path / "a")
    with pytest.raises(kpro.CheckpointError, match="unmerged adapters"):
        kpro.save_pretrained(bt.model, tmp_path / "model")
    with pytest.raises(NotImplementedError, match="Not meaningful"):
        bt.merged()


@pytest.mark.parametrize("change, message", [
    (lambda ids, p, m: (ids, torch.tensor([0, 1, 2, 3]), m), "prompt lengths must be >= 1"),
    (lambda ids, p, m: (ids, torch.tensor([9, 1, 2, 3]), m), "at least one answer token"),
    (lambda ids, p, m: (ids, p[:3], m), "prompt_lens must be an integer tensor"),
    # torch's "Subtraction, the `-` operator, with a bool tensor is not supported" before
    (lambda ids, p, m: (ids, p > 0, m), r"prompt_lens must be an integer tensor \[B=4\] of lengths, got \(4,\) "
                                         r"torch.bool"),
    (lambda ids, p, m: (ids > 5, p, m), r"input_ids must be an integer tensor \[B, T\], got \(4, 12\) torch.bool"),
    (lambda ids, p, m: (ids, p, m[:3]), "attention_mask must be"),
    (lambda ids, p, m: (ids, p, m.flip(1)), "right-padded"),
    # a 2 counted as two tokens: the answer stream took row 2's last token again, a phantom answer token
    (lambda ids, p, m: (ids, p, m.index_put((torch.tensor([2]), torch.tensor([11])), torch.tensor(2))),
     r"attention_mask must hold 1 \(real token\) and 0 \(padding\) only"),
    (lambda ids, p, m: (ids.float(), p, m), "integer tensor"),
    (lambda ids, p, m: (ids.index_fill(1, torch.tensor([1]), 10_000), p, m), r"token ids outside \[0, vocab_size="),
    (lambda ids, p, m: (ids.index_fill(1, torch.tensor([6]), -1), p, m), r"token ids outside \[0, vocab_size="),
])
def test_bad_input(change, message):
    bt = make()
    ids, plens, mask, _ = batch()
    with pytest.raises(ValueError, match=message):
        bt.loss(*change(ids, plens, mask))
    with pytest.raises(ValueError, match=r"prompt 0\[2\] = 67 is outside the vocabulary"):
        bt.generate([[1, 2, bt.model.config.vocab_size]], 2)


def test_a_batch_given_as_streams():
    """forward and loss take the batch split into Streams (the form torch.compile traces) with the same
    numbers; malformed streams and streams with lengths on the side are refused, naming the culprit, and
    lengths out of range are refused on the separate passes as on the fused one."""
    bt = make(dtype=torch.float32)
    ids, plens, mask, _ = batch()
    streams = split_streams(ids, plens, mask)
    assert torch.equal(bt(streams), bt(ids, plens, mask)) and torch.equal(bt.loss(streams), bt.loss(ids, plens, mask))
    with pytest.raises(ValueError, match="pass no prompt_lens or attention_mask"):
        bt(streams, plens)
    with pytest.raises(ValueError, match="needs prompt_lens"):
        bt(ids)
    fields = dict(vars(streams))
    for name, bad, message in (("prompt_lens", fields["prompt_lens"].float(), "Streams.prompt_lens must be an integer"),
                               ("answer_lens", fields["answer_lens"][:2], "Streams.answer_lens must have the answer "
                                                                         "stream's batch size B=4"),
                               ("prompt_ids", fields["prompt_ids"][0], "must be \\[B, T\\]")):
        with pytest.raises(ValueError, match=message):
            Streams(**dict(fields, **{name: bad}))
    too_long = Streams(**dict(fields, answer_lens=fields["answer_lens"] + streams.answer_ids.shape[1]))
    for fused in (True, False):
        with pytest.raises(ValueError, match="answer_lens must lie in"):
            bt(too_long, fused=fused)
    # a row with no answer token to predict: as ids it is refused; as Streams its loss left the row out unsaid
    lens = fields["answer_lens"].clone()
    lens[2] = 1
    with pytest.raises(ValueError, match=r"Bitune.loss: every row of the Streams needs an answer token to predict "
                                         r"\(answer_lens >= 2.*rows \[2\] have none"):
        bt.loss(Streams(**dict(fields, answer_lens=lens)))
    assert bt(Streams(**dict(fields, answer_lens=lens))).shape == bt(streams).shape  # forward: generate's prefill


@pytest.mark.parametrize("prompts, max_new_tokens, message", [
    ([5, 6, 7], 4, r"takes a list of prompts, each a sequence of token ids: prompt 0 is 5 \(one prompt: \[ids\]\)"),
    (torch.tensor([5, 6, 7]), 4, "takes a list of prompts"),
    ([[5, 6], []], 4, "prompt 1 is empty"),
    ([], 4, "needs at least one prompt"),
    ([[5, 6, 7]], -5, "max_new_tokens must be a positive integer, got -5"),  # a RuntimeError from torch.zeros before
    ([[5, 6, 7]], 2.5, "max_new_tokens must be a positive integer, got 2.5"),
    # the model's check said "input_ids hold token ids outside [0, vocab_size=67)", naming neither prompt nor id
    ([[5, 6], [5, 67, 7]], 4, r"Bitune.generate: prompt 1\[1\] = 67 is outside the vocabulary \[0, 67\)"),
    ([[5, -1]], 4, r"Bitune.generate: prompt 0\[1\] = -1 is outside the vocabulary \[0, 67\)"),
    ([[5, 6, 7]], "3", "max_new_tokens must be a positive integer, got '3'"),
])
def test_generation_refuses_what_it_cannot_read(prompts, max_new_tokens, message):
    bt = make()
    with pytest.raises(ValueError, match=message):
        bt.generate(prompts, max_new_tokens)
    assert bt.generate(torch.tensor([[5, 6, 7]]), 2) == bt.generate([[5, 6, 7]], 2)  # rows of a 2-D tensor are prompts


@pytest.mark.parametrize("sampling, error, message", [
    (dict(temprature=0.5), TypeError, r"Bitune.generate got unexpected keyword arguments \['temprature'\]"),
    (dict(eos_token_id=10**6), ValueError, "eos_token_id 1000000 is outside the vocabulary"),
    (dict(pad_token_id=-5), ValueError, "pad_token_id -5 is outside the vocabulary"),
    (dict(pad_token_id=[1, 2]), TypeError, "pad_token_id must be one token id"),
    (dict(stop_after_eos=0), ValueError, "stop_after_eos must be a positive integer, got 0"),
    (dict(stop_after_eos=2**63), ValueError, r"stop_after_eos must be at most 2\*\*63 - 1"),  # wrapped in int64
    (dict(generator="x"), TypeError, "generator must be a torch.Generator"),
])
def test_generation_refuses_bad_decoding_arguments_before_the_prefill(monkeypatch, sampling, error, message):
    bt = make()
    import kpro.bitune.wrapper as wrapper

    def no_prefill(*args, **kwargs):
        raise AssertionError("the prefill ran before the argument was refused")
    monkeypatch.setattr(wrapper, "fused_passes", no_prefill)
    monkeypatch.setattr(wrapper, "separate_passes", no_prefill)
    with pytest.raises(error, match=message):
        bt.generate([[5, 6, 7]], 2, **sampling)


def test_generation_past_the_model_positions_is_refused():
    bt = make()
    limit = bt.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's max_position_embeddings={limit}"):
        bt.generate([[5] * (limit - 3)], max_new_tokens=4)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown Bitune mode 'fancy'"):
        Bitune(kpro.Llama(tiny_config()), mode="fancy")


def test_mixing_settings_that_cannot_train_are_refused():
    """mix_init 0 left α at 0 for good (|w| has no gradient at 0), an infinite or NaN one made α NaN, and an
    infinite mix_eps made α 0: each was accepted silently."""
    w = torch.zeros(1, requires_grad=True)
    (w.abs() / (w.abs() + 0.01)).sum().backward()
    assert w.grad.item() == 0  # why 0 is refused
    for mix_init in (0, 0.0, float("inf"), float("nan"), True, "0.01"):
        with pytest.raises(ValueError, match="mix_init must be a finite number other than 0"):
            Bitune(kpro.Llama(tiny_config()), mix_init=mix_init)
    for mix_eps in (0.0, -0.01, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="mix_eps must be a finite number > 0"):
            Bitune(kpro.Llama(tiny_config()), mix_eps=mix_eps)
    negative = Bitune(kpro.Llama(tiny_config()), mix_init=-0.02)  # |w| is what counts: allowed
    assert all(torch.allclose(a, torch.full((2,), 2 / 3)) for a in negative.mix_weights())


def test_the_mix_is_computed_in_fp32_and_cast_back():
    from kpro.ops.bitune_attention import mix_kv

    gen = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(4, 64, 8, generator=gen).bfloat16() for _ in range(2))
    alpha = torch.tensor(0.3137, dtype=torch.float32)
    mixed = mix_kv(x0, x1, alpha)
    assert mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, ((1 - alpha) * x0.float() + alpha * x1.float()).bfloat16())
    # Left to type promotion, the 0-dim fp32 alpha does not promote bf16: the old expression rounds in bf16.
    naive = (1 - alpha) * x0 + alpha * x1
    assert naive.dtype == torch.bfloat16 and not torch.equal(naive, mixed)
    # Gradients reach both caches and alpha, as the kernels' backward gives them.
    leaves = [x0.float().requires_grad_(), x1.float().requires_grad_(), alpha.clone().requires_grad_()]
    mix_kv(*leaves).sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    torch.testing.assert_close(leaves[0].grad, torch.full_like(x0.float(), 1 - 0.3137), rtol=1e-6, atol=0)
    torch.testing.assert_close(leaves[1].grad, torch.full_like(x0.float(), 0.3137), rtol=1e-6, atol=0)
    torch.testing.assert_close(leaves[2].grad, (x1.float() - x0.float()).sum(), rtol=1e-5, atol=0)
    # float64 stays float64 (the independent references compare to 1e-15), and alpha gets its gradient.
    y0, y1 = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    a = torch.tensor(0.25, requires_grad=True)
    out = mix_kv(y0, y1, a)
    assert out.dtype == torch.float64 and torch.equal(out, (1 - a.double()) * y0 + a.double() * y1)
    out.sum().backward()
    torch.testing.assert_close(a.grad.double(), (y1 - y0).sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_generation_decodes_from_the_mix_the_answer_stream_attends_to(fused, monkeypatch):
    """The first token comes from the attention over the mixed cache, the later ones from the decoding cache:
    both must hold the same mix, in fp32 cast to bf16 (the Triton kernel's), or the two disagree under bf16."""
    import importlib
    import sys

    from kpro.bitune import passes
    ops_bitune = importlib.import_module("kpro.ops.bitune_attention")  # the module (kpro.ops exports the function)

    seen = {"attention": [], "cache": []}
    original, store = ops_bitune.mix_kv, passes._store

    def mix(x0, x1, alpha):  # the mixes the answer stream's attention reads (fused: the reference op's own)
        out = original(x0, x1, alpha)
        if sys._getframe(1).f_code.co_name in ("bitune_attention_reference", "separate_passes", "<listcomp>"):
            seen["attention"].append(out)
        return out

    def stored(cache, i, k, v, k_a, v_a):
        seen["cache"] += [k.clone(), v.clone()]
        store(cache, i, k, v, k_a, v_a)
    monkeypatch.setattr(ops_bitune, "mix_kv", mix)
    monkeypatch.setattr(passes, "mix_kv", mix)
    monkeypatch.setattr(passes, "_store", stored)
    bt = make(dtype=torch.bfloat16)
    ids, plens, mask, seqs = batch()
    prompts = [seq[:p] for seq, p in zip(seqs, plens.tolist())]
    bt.generate(prompts, 3, fused=fused, eos_token_id=[])
    layers = bt.model.config.num_hidden_layers
    assert len(seen["cache"]) == len(seen["attention"]) == 2 * layers
    assert all(t.dtype == torch.bfloat16 for t in seen["cache"])
    assert all(torch.equal(a, c) for a, c in zip(seen["attention"], seen["cache"]))


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[1:2])  # Triton: GPU, or interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_first_generated_token_and_the_later_ones_read_the_same_mix(backend, device, dtype, monkeypatch):
    """On the kernel backend the first token attends to the mix of the Triton kernel (fma(α, x1 − x0, x0) in
    fp32) and the later ones to the decoding cache, which mix_kv filled ((1 − α)·x0 + α·x1): some entries
    differed by a unit in the last place. The cache now holds the kernel's mix: both, every layer, bit for bit."""
    import sys

    from kpro.bitune import passes
    from kpro.ops.backend import interpreter_bf16_problem
    from kpro.ops.triton_kernels import bitune_attention as kernels
    from test_ops_rms_norm import bits

    if dtype == torch.bfloat16 and device == "cpu" and interpreter_bf16_problem():
        pytest.skip(interpreter_bf16_problem())
    attended, cached = [], []

    def mixed_cache(*args):  # the mixes the attention forward reads (not the cache's own call)
        out = real_mix(*args)
        if sys._getframe(1).f_code.co_name == "forward":
            attended.append(out)
        return out

    def store(cache, i, k, v, k_a, v_a):
        cached.append((k.clone(), v.clone()))
        real_store(cache, i, k, v, k_a, v_a)
    real_mix, real_store = kernels.mixed_cache, passes._store
    monkeypatch.setattr(kernels, "mixed_cache", mixed_cache)
    monkeypatch.setattr(passes, "_store", store)
    bt = make(dtype=dtype, device=device, w=(0.7, -0.013))
    ids, plens, mask, seqs = batch()
    with kpro.ops.backend(backend):
        bt.generate([seq[:p] for seq, p in zip(seqs, plens.tolist())], 2, fused=True, eos_token_id=[])
    layers = bt.model.config.num_hidden_layers
    assert len(attended) == len(cached) == layers  # the prefill's (decoding appends to the cache itself)
    for (k_mix, v_mix), (k_cache, v_cache) in zip(attended, cached):
        assert k_mix.dtype == dtype and torch.equal(bits(k_mix), bits(k_cache))
        assert torch.equal(bits(v_mix), bits(v_cache))


def test_applying_bitune_twice_to_one_model_is_refused():
    model = kpro.Llama(tiny_config())
    first = Bitune(model)
    with pytest.raises(ValueError, match=r"this model has LoRA adapters already \(Bitune, or LoRA, was applied to it "
                                         r"before\)"):
        Bitune(model)
    assert first.adapter_names == sorted({n for layer in lora.lora_layers(model) for n in layer.adapters})


def test_kpro_instruct_is_kpro_bitune_however_it_is_imported():
    """The docs call `kpro.instruct` an alias of `kpro.bitune`; only the attribute worked, `import kpro.instruct`
    and `from kpro.instruct import tune` raised ModuleNotFoundError. A fresh interpreter, as a user's."""
    code = ("import kpro, kpro.bitune; a = kpro.instruct; import kpro.instruct as b; from kpro.instruct import tune; "
            "print(a is kpro.bitune, b is kpro.bitune, tune is kpro.bitune.tune)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]


def test_kpro_instruct_submodules_are_kpro_bitunes():
    """`import kpro.instruct.evaluation` loaded a second copy of kpro.bitune's evaluation.py (its own Bitune class:
    a kpro.Bitune was scored as a causal model) and rebound kpro.bitune.evaluation to that copy. A fresh
    interpreter, as a user's."""
    code = ("import sys, kpro.instruct.evaluation as ev, kpro.instruct.command; from kpro.instruct.wrapper import Bitune; "
            "import kpro, kpro.bitune; "
            "print(ev is sys.modules['kpro.bitune.evaluation'] is kpro.bitune.evaluation, Bitune is kpro.Bitune, "
            "kpro.instruct.command is sys.modules['kpro.bitune.command'], ev.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "kpro.bitune.evaluation"]


def test_split_streams_pads_the_prompt_stream_with_zeros_after_each_prompt():
    """Rows of prompt lengths 2 and 4: the prompt stream holds prompt[:P-1], then 0 (prompt[P-1] starts the answer
    stream, not the prompt stream's padding)."""
    from kpro.bitune import split_streams
    ids = torch.tensor([[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]])
    streams = split_streams(ids, torch.tensor([2, 4]))
    assert streams.prompt_ids.tolist() == [[11, 0, 0], [21, 22, 23]]
    assert streams.answer_ids.tolist() == [[12, 13, 14, 15, 16], [24, 25, 26, 0, 0]]


def test_the_base_dtype_is_the_one_most_tensors_hold():
    """A02 (adapters.py `max(set(dtypes), key=dtypes.count)` -> `dtypes[-1]`): a bf16 model whose embedding, head
    and norms are kept in float32 (a mixed checkpoint loaded as stored) records base_dtype bfloat16, the dtype of
    most of its tensors; every test model before held one dtype."""
    model = kpro.Llama(tiny_config()).to(torch.bfloat16)
    for name, module in model.named_modules():
        if isinstance(module, kpro.model.RMSNorm) or name in ("embed_tokens", "lm_head"):
            module.float()
    tensors = model.state_dict().values()
    counted = {dtype: sum(t.dtype == dtype for t in tensors) for dtype in (torch.bfloat16, torch.float32)}
    assert counted[torch.bfloat16] > counted[torch.float32]  # the premise: 14 matrices against 7
    assert kpro.adapters.base_dtype(model) == torch.bfloat16
    assert kpro.adapters.base_record(model)["base_dtype"] == "bfloat16"


# Mutation round 13
def test_every_kpro_bitune_submodule_is_aliased_under_kpro_instruct():
    code = ("import importlib, pkgutil, sys, kpro.bitune, kpro.instruct\n"
            "for s in pkgutil.iter_modules(kpro.bitune.__path__):\n"
            "    m = importlib.import_module('kpro.instruct.' + s.name)\n"
            "    assert m is importlib.import_module('kpro.bitune.' + s.name), s.name\n"
            "    assert m.__name__ == 'kpro.bitune.' + s.name, m.__name__\n"
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_the_adapter_file_holds_each_mixing_scalar_under_its_own_name(tmp_path):
    """`model.layers.{i}.bitune.w_k` holds w_k[i], and w_v its own: a save and load that swapped both ways
    passed the round trip, but any other reader of the file (or a file from another writer) got K and V mixed."""
    from safetensors.torch import load_file

    bt = make(dtype=torch.float32)  # w_k = (0.02, -0.005), w_v = (-0.005, 0.02): distinct per layer
    assert not torch.equal(bt.w_k, bt.w_v)
    bt.save_adapters(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapters.safetensors"))
    for i in range(bt.model.config.num_hidden_layers):
        assert torch.equal(saved[f"model.layers.{i}.bitune.w_k"], bt.w_k.detach()[i])
        assert torch.equal(saved[f"model.layers.{i}.bitune.w_v"], bt.w_v.detach()[i])
