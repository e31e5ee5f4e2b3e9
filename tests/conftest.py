import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; it is read when a kernel is
# defined, so it is set before kpro imports any (they are imported on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kpro  # noqa: E402

CUDA = torch.cuda.is_available()


def _faithful_interpreter_bf16():
    """Make Triton's CPU interpreter treat bfloat16 as a GPU does; the kernels under test are unchanged.

    The interpreter (triton 3.x) stores bf16 as raw uint16 bits and (1) hands them to np.matmul as
    integers, so tl.dot on bf16 returns garbage, and (2) casts fp32 to bf16 by truncating the mantissa,
    where GPUs round to nearest even, doubling the rounding error. Decode the bits to float32 for dots
    (exact products, fp32 accumulation, as tensor cores compute) and round casts to nearest even."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def as_float32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(as_float32(a), as_float32(b), dtype=np.float32)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl


def _interpreter_loop_bounds():
    """Let Triton 3.6's interpreter take a loop bound computed in the kernel under numpy >= 2.4.

    The interpreter holds a scalar as a one-element array and turns it into a `range` bound with
    int(array); numpy 2.4 refuses that ("only 0-dimensional arrays can be converted to Python scalars"),
    so every kernel whose tile loop starts or ends at a computed tile fails. Triton 3.8 squeezes the array
    first: do the same, so the suite runs on the oldest Triton kpro supports. The kernels are unchanged."""
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a later interpreter, organised differently
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if not CUDA:
    _faithful_interpreter_bf16()
    _interpreter_loop_bounds()


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not CUDA:
        pytest.skip("needs an NVIDIA GPU")


def backend_devices():
    """(backend, device) pairs to test every op with: Triton on the GPU where there is one, else in
    the CPU interpreter; the CUDA C++ kernels only on a GPU (marked, skipped elsewhere)."""
    pairs = [pytest.param("torch", "cpu", id="torch-cpu"),
             pytest.param("triton", "cuda" if CUDA else "cpu", id="triton-" + ("cuda" if CUDA else "cpu"))]
    pairs += [pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.cuda),
              pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda)]
    return pairs


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """‖out − ref‖ / max(‖ref‖, floor·√n) in float64; NaN anywhere in out makes it NaN (never passes).
    The floor keeps a reference that is exactly zero (a gradient that vanishes) comparable."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    return float((out - ref).norm() / max(float(ref.norm()), floor * out.numel() ** 0.5))


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


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
