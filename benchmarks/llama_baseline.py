"""A compact from-scratch PyTorch LLaMA in the style of gpt-fast / nanoGPT, written here as the speed
baseline for kpro's model: fused qkv and gate/up projections, precomputed float32 RoPE tables,
torch's own RMSNorm and scaled_dot_product_attention. Loads its weights from a kpro.Llama."""
import torch
import torch.nn.functional as F
from torch import nn


class BaselineBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.attention_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.wqkv = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def attention(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], -1)
        q = rotate(q.view(B, T, self.n_head, self.head_dim), cos, sin).transpose(1, 2)
        k = rotate(k.view(B, T, self.n_kv, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        gate, up = self.w13(self.ffn_norm(h)).chunk(2, dim=-1)
        return h + self.w2(F.silu(gate) * up)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class BaselineLlama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(BaselineBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.max_position_embeddings).float(), inv_freq)
        angles = torch.cat((angles, angles), -1)
        self.register_buffer("cos", angles.cos()[:, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[:, None, :], persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok_embeddings(idx)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))

    @classmethod
    def from_kpro(cls, model, dtype=None):
        """The same weights, in `dtype` (the model's by default; a wider one for a reference, whose RoPE tables
        are then not rounded to the model's dtype)."""
        weight = model.embed_tokens.weight
        base = cls(model.config).to(device=weight.device, dtype=dtype or weight.dtype)
        with torch.no_grad():
            base.tok_embeddings.weight.copy_(model.embed_tokens.weight)
            base.norm.weight.copy_(model.norm.weight)
            base.output.weight.copy_(model.lm_head.weight)
            for ours, theirs in zip(base.layers, model.layers):
                a, m = theirs.self_attn, theirs.mlp
                ours.wqkv.weight.copy_(torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)))
                ours.wo.weight.copy_(a.o_proj.weight)
                ours.w13.weight.copy_(torch.cat((m.gate_proj.weight, m.up_proj.weight)))
                ours.w2.weight.copy_(m.down_proj.weight)
                ours.attention_norm.weight.copy_(theirs.input_layernorm.weight)
                ours.ffn_norm.weight.copy_(theirs.post_attention_layernorm.weight)
        return base

    def kpro_grads(self) -> dict[str, torch.Tensor]:
        """The gradients of this model's parameters under kpro.Llama's parameter names (fused projections
        split back), for comparing with a kpro model's; parameters without a gradient are left out."""
        grads = {}

        def put(name, grad):
            if grad is not None:
                grads[name] = grad

        put("embed_tokens.weight", self.tok_embeddings.weight.grad)
        put("norm.weight", self.norm.weight.grad)
        put("lm_head.weight", self.output.weight.grad)
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            q, k, v = (None,) * 3
            if layer.wqkv.weight.grad is not None:
                q, k, v = layer.wqkv.weight.grad.split(
                    [layer.n_head * layer.head_dim, layer.n_kv * layer.head_dim, layer.n_kv * layer.head_dim])
            gate, up = layer.w13.weight.grad.chunk(2) if layer.w13.weight.grad is not None else (None, None)
            for name, grad in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                               ("self_attn.o_proj", layer.wo.weight.grad), ("mlp.gate_proj", gate),
                               ("mlp.up_proj", up), ("mlp.down_proj", layer.w2.weight.grad),
                               ("input_layernorm", layer.attention_norm.weight.grad),
                               ("post_attention_layernorm", layer.ffn_norm.weight.grad)):
                put(p + name + ".weight", grad)
        return grads
