"""Parity with Hugging Face transformers, when it happens to be installed (never a kpro dependency)."""
import warnings

import pytest
import torch

import kpro

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "gqa": dict(),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=1),
    "llama3_rope": dict(rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def hf_logits(model_dir, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits, hf


@pytest.mark.parametrize("variant", VARIANTS)
def test_kpro_checkpoint_gives_same_logits_in_transformers(tmp_path, make_model, variant):
    model = make_model(dtype=torch.float32, **VARIANTS[variant])
    kpro.save_pretrained(model, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    theirs, _ = hf_logits(tmp_path, ids)
    with torch.no_grad():
        ours = model(ids)
    assert (ours - theirs).abs().max() < 1e-4


# transformers runs hidden_act "swish" as nn.SiLU, silu's other name (kpro refused it); kpro saves "silu"
LOADED_VARIANTS = {**VARIANTS, "swish": dict(hidden_act="swish")}


@pytest.mark.parametrize("variant", LOADED_VARIANTS)
def test_transformers_checkpoint_gives_same_logits_in_kpro(tmp_path, variant):
    spec = dict(vocab_size=67, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, initializer_range=0.15)
    spec.update(LOADED_VARIANTS[variant])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec)).eval()
    hf.save_pretrained(tmp_path)  # recent transformers writes the newer rope_parameters form
    model = kpro.load_pretrained(tmp_path)
    ids = torch.randint(0, 67, (2, 40))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_embedding_gradients_equal_transformers_where_the_pad_id_is_a_real_token(tmp_path):
    spec = dict(vocab_size=67, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15, pad_token_id=2,
                eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec))
    hf.save_pretrained(tmp_path)
    model = kpro.load_pretrained(tmp_path)
    ids = torch.tensor([[1, 9, 2, 14, 2, 30, 8, 2]])
    hf(ids, labels=ids).loss.backward()
    torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).backward()
    theirs, ours = hf.model.embed_tokens.weight.grad, model.embed_tokens.weight.grad
    assert not theirs[2].any() and (ours - theirs).abs().max() < 1e-5
