import pytest
import torch

import kpro


def tiny_config(**overrides) -> kpro.LlamaConfig:
    """A small but complete model: GQA, odd-ish sizes, every code path exercised."""
    fields = dict(vocab_size=67, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.15)
    fields.update(overrides)
    return kpro.LlamaConfig(**fields)


def randomize_norms(model: kpro.Llama, generator: torch.Generator) -> None:
    """Norm weights start at 1; make them random so a mistake in their use cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))


@pytest.fixture
def make_model():
    def make(seed=0, dtype=torch.float64, **overrides):
        torch.manual_seed(seed)
        model = kpro.Llama(tiny_config(**overrides)).to(dtype)
        randomize_norms(model, torch.Generator().manual_seed(seed + 1))
        return model
    return make
