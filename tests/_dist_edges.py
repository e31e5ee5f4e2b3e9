"""Worker for tests/test_train_distributed.py, run under torchrun with 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_edges.py OUT SCENARIO

One SCENARIO a run, each writing OUT/SCENARIO-rank{R}.json ({"error": what fit raised, or None}) for the test:
- uneven: a plain generator that runs out after 2 batches on rank 1 alone (steps=4); each batch draws from the
  global torch RNG, whose state after each batch goes to OUT/uneven-rng-rank{R}.pt;
- fsdp-shape, fsdp-layers: parallel='fsdp' with another intermediate_size, or one more layer, on rank 1;
  ddp-shape: parallel='ddp' with another intermediate_size on rank 1;
- trainable-ddp, trainable-fsdp: rank 0 training block 0 only, rank 1 block 1 only (parameters of the same shapes);
- partial: a torch DataLoader of 15 examples in batches of 8 (drop_last=False), whose last batch of 7 rows
  cannot be split between the 2 processes.
The process group times out after 20 seconds, not torchrun's 30 minutes: a process left waiting fails the test soon.
"""
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import kpro.train as kt
from _dist_checks import error_of
from _dist_fit import exit_now
from test_train_fit import batches, examples, make_model


def main(out: Path, scenario: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    env = kt.init_distributed()
    assert env.world_size == 2, env
    result = {}
    if scenario == "uneven":
        rngs = []

        def uneven():
            for i, batch in enumerate(batches()):
                if env.rank == 1 and i == 2:
                    return
                batch["noise"] = torch.rand(())  # a batch made with the global RNG (a random augmentation, say)
                rngs.append(torch.get_rng_state())
                yield batch
        result["error"] = error_of(lambda: kt.fit(make_model(), uneven(), out / "run", steps=4, lr=1e-3))
        torch.save(rngs, out / f"uneven-rng-rank{env.rank}.pt")
    elif scenario.startswith("fsdp-"):
        other = {"fsdp-shape": {"intermediate_size": 96}, "fsdp-layers": {"num_hidden_layers": 3}}[scenario]
        model = make_model(**(other if env.rank == 1 else {}))
        result["error"] = error_of(lambda: kt.fit(model, batches(), out / "run", steps=1, parallel="fsdp", lr=1e-3))
    elif scenario.startswith("trainable-"):  # rank 0 trains block 0 only, rank 1 block 1 only: the same shapes
        model = make_model()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(f"layers.{env.rank}."))
        mode = scenario.removeprefix("trainable-")
        result["error"] = error_of(lambda: kt.fit(model, batches(), out / "run", steps=1, parallel=mode, lr=1e-3))
    elif scenario == "ddp-shape":
        model = make_model(**({"intermediate_size": 96} if env.rank == 1 else {}))
        result["error"] = error_of(lambda: kt.fit(model, batches(), out / "run", steps=1, parallel="ddp", lr=1e-3))
    elif scenario == "partial":
        loader = DataLoader(examples(15), batch_size=8, collate_fn=lambda rows: kt.collate_prompt_answer(rows, pad_id=0))
        result["error"] = error_of(lambda: kt.fit(make_model(), loader, out / "run", lr=1e-3))
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    (out / f"{scenario}-rank{env.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
