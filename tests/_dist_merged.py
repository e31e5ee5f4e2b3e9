"""Worker for tests/test_train_distributed.py, run under torchrun with 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_merged.py OUT

A LoRA model with adapter a merged into every layer, each process's its own (base and adapter seeded by rank), its
norms trained. Writes OUT/merged-rank{R}.json for the test to read (and OUT/merged-ddp.pt, rank 0's trained weights):
- fit under DDP, whose start-up broadcast copies rank 0's weights into every process's in place: the error (None),
  and after unmerge() the largest difference of each process's weights to rank 0's base;
- the same with one merged weight changed in place on rank 0 before fit (stale there, and so everywhere after the
  broadcast): the error each process raised; and with a merged adapter changed so: the error, and after unmerge()
  (which subtracts the update rank 0 merged) the largest difference to rank 0's base;
- the same with one layer unmerged on process 1 alone: the error;
- fit under FSDP, of the model and of one sharded by the caller: the errors, and whether the model still runs.
The process group times out after a minute: a process left waiting fails the test soon.
"""
import datetime
import json
import sys
from pathlib import Path

import torch

import kpro.lora as lora
import kpro.train as kt
from _dist_checks import error_of
from _dist_fit import exit_now
from test_train_fit import batches, make_model

MERGED_FIT = dict(steps=2, lr=1e-2)


def merged_model(seed: int = 0) -> torch.nn.Module:
    """Adapter a (its B nonzero: the merge changes the weight) merged into every LoRA layer; the norms trainable."""
    model = make_model(seed)
    lora.add_adapters(model, ["a"], rank=4, alpha=2.0, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for layer in lora.lora_layers(model):
        with torch.no_grad():
            layer.adapters["a"].lora_B.weight.normal_(std=0.1, generator=generator)
        layer.merge("a")
    for name, param in model.named_parameters():
        if "norm" in name:
            param.requires_grad_(True)
    return model


def unmerged_difference(model: torch.nn.Module, seed: int) -> float:
    """The largest difference of the LoRA layers' weights to those of the base model seeded by `seed`."""
    base = make_model(seed).state_dict()
    return max((layer.weight - base[f"{name}.weight"]).abs().max().item() for name, layer in model.named_modules()
               if isinstance(layer, lora.LoRALinear))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    env = kt.init_distributed()
    assert env.world_size == 2, env
    results = {}

    model = merged_model(seed=env.rank)
    results["ddp_error"] = error_of(lambda: kt.fit(model, batches(), out / "ddp", parallel="ddp", **MERGED_FIT))
    if env.is_main:
        torch.save(model.state_dict(), out / "merged-ddp.pt")
    results["unmerge_error"] = error_of(lambda: [layer.unmerge() for layer in lora.lora_layers(model)])
    results["unmerged_difference"] = unmerged_difference(model, seed=0)

    model = merged_model(seed=env.rank)
    if env.is_main:
        with torch.no_grad():
            lora.lora_layers(model)[3].weight.mul_(1)
    results["stale_error"] = error_of(lambda: kt.fit(model, batches(), out / "stale", parallel="ddp", **MERGED_FIT))

    model = merged_model(seed=env.rank)
    if env.is_main:
        with torch.no_grad():
            lora.lora_layers(model)[3].adapters["a"].lora_A.weight.mul_(1)
    results["stale_adapter_error"] = error_of(lambda: kt.fit(model, batches(), out / "stale-adapter", parallel="ddp",
                                                             **MERGED_FIT))
    results["stale_adapter_unmerge_error"] = error_of(lambda: [layer.unmerge() for layer in lora.lora_layers(model)])
    results["stale_adapter_unmerged_difference"] = unmerged_difference(model, seed=0)

    model = merged_model(seed=0)
    if not env.is_main:
        lora.lora_layers(model)[2].unmerge()
    results["apart_error"] = error_of(lambda: kt.fit(model, batches(), out / "apart", parallel="ddp", **MERGED_FIT))

    model = merged_model(seed=env.rank)
    results["fsdp_error"] = error_of(lambda: kt.fit(model, batches(), out / "fsdp", parallel="fsdp", **MERGED_FIT))
    results["fsdp_model_error"] = error_of(lambda: model(next(iter(batches()))["input_ids"]))
    from torch.distributed.fsdp import fully_shard
    sharded = fully_shard(merged_model(seed=0))
    results["sharded_error"] = error_of(lambda: kt.fit(sharded, batches(), out / "sharded", **MERGED_FIT))

    (out / f"merged-rank{env.rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
