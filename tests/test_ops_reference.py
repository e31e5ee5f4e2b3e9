"""The plain-PyTorch ops the model runs on, against float64 formulas written out here."""
import math

import pytest
import torch

from kpro import ops


def naive_attention(q, k, v, causal, prefix_lens=None, key_mask=None):
    """Loops over rows, heads and queries; a query that sees no key gives zeros."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Tq):
                pos = i + Tk - Tq
                visible = []
                for j in range(Tk):
                    ok = (not causal) or j <= pos or (prefix_lens is not None and pos < prefix_lens[b] and j < prefix_lens[b])
                    if key_mask is not None and not key_mask[b][j]:
                        ok = False
                    if ok:
                        visible.append(j)
                if not visible:
                    continue
                scores = torch.stack([q[b, i, h].double() @ k[b, j, g].double() for j in visible]) / math.sqrt(D)
                p = torch.softmax(scores, 0)
                out[b, i, h] = sum(p[n] * v[b, j, g].double() for n, j in enumerate(visible))
    return out


CASES = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "decode_tq_lt_tk": dict(causal=True, tq=3),
    "prefix": dict(causal=True, prefix_lens=[4, 1, 7]),
    "key_padding_left": dict(causal=True, key_mask=[[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0] * 6 + [1]]),
    "prefix_and_right_padding": dict(causal=True, prefix_lens=[3, 5, 2], key_mask=[[1] * 5 + [0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]]),
    "full_with_padding": dict(causal=False, key_mask=[[0, 1, 1, 1, 1, 1, 1], [1] * 7, [1, 1, 0, 0, 0, 0, 0]]),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_masks_match_loops(case):
    spec = dict(CASES[case])
    tq = spec.pop("tq", 7)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, tq, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 7, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 7, 2, 8, generator=gen, dtype=torch.float64)
    prefix = torch.tensor(spec["prefix_lens"]) if "prefix_lens" in spec else None
    key_mask = torch.tensor(spec["key_mask"]) if "key_mask" in spec else None
    out = ops.attention(q, k, v, causal=spec["causal"], prefix_lens=prefix, attention_mask=key_mask)
    ref = naive_attention(q, k, v, spec["causal"], spec.get("prefix_lens"), spec.get("key_mask"))
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()  # rows that see nothing (all-padding) give zero and a finite gradient
    assert torch.isfinite(q.grad).all()


def test_attention_rejects_bad_shapes():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        ops.attention(q, k, k)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ops.attention(torch.randn(1, 5, 2, 8), k, k)
    with pytest.raises(ValueError, match="causal=True"):
        ops.attention(k, k, k, causal=False, prefix_lens=torch.tensor([2]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ops.attention(k, k, k, attention_mask=torch.ones(1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_and_swiglu_match_formulas(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 37, generator=gen, dtype=torch.float64)
    w = torch.randn(37, generator=gen, dtype=torch.float64)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    out = ops.rms_norm(x.to(dtype), w.to(dtype), 1e-5)
    assert out.dtype == dtype and float((out.double() - ref).norm() / ref.norm()) < (1e-6 if dtype == torch.float32 else 1e-14)
    g, u = torch.randn(2, 3, 41, generator=gen, dtype=torch.float64), torch.randn(2, 3, 41, generator=gen, dtype=torch.float64)
    ref = g / (1 + torch.exp(-g)) * u
    out = ops.swiglu(g.to(dtype), u.to(dtype))
    assert out.dtype == dtype and float((out.double() - ref).norm() / ref.norm()) < (1e-6 if dtype == torch.float32 else 1e-14)
