"""Worker for tests/test_train_distributed.py, run under torchrun with 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_checks.py OUT

Writes OUT/checks-rank{R}.json for the test to read:
- no shared file system: each process works in its own directory OUT/node{R} with a relative out_dir, so only
  rank 0 sees the checkpoints it writes; a second fit of the same run must resume on every process, and
  every process must read rank 0's saved schedule;
- data told apart by rank (a TokenShards given another rank and world size, a Batches seeded by rank), a run
  directory another process holds, and a parameter made trainable after DDP wrapped the model (then
  run.reset_optimizer(), or in a group added in on_fit_start): the error each process raised;
- a Batches that rank 0 alone took a batch from before a new run: the losses of that run;
- fit settings that differ between the processes (steps, lr, an optimizer factory's lr): the error each raised;
- FSDP2 of models initialised differently on each process: runs that the test compares with DDP's;
- DDP of a LoRA model training one of two adapters (the other trainable, getting no gradient): each process's
  weights (OUT/idle-rank{R}.pt) and how many parameters AdamW holds no state for; and the error when a
  parameter without a gradient at the first step gets one later;
- a DataLoader with a DistributedSampler (each process passing its own rows as the global batch): the error;
- run.stop() and run.save_checkpoint() asked for on rank 0 alone (after step 1, and a stop in on_fit_start): the
  step each process returned at;
- a loop of one's own giving save_checkpoint and load_checkpoint a DDP wrapper: the weights saved
  (OUT/own-weights.pt) and the largest difference to them of a second wrapped model loaded from the checkpoint;
- ValidationAccuracy in a run with parallel='fsdp', and kpro.generate given a sharded model: the errors.
The process group times out after a minute, not torchrun's 30: a process left waiting fails the test soon.
"""
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import kpro
import kpro.lora as lora
import kpro.train as kt
from _dist_fit import exit_now
from kpro.internalize import ValidationAccuracy, multiplication_tokenizer, multiplication_training_set, parse_line
from kpro.train.checkpointing import saved_schedule
from test_train_fit import batches, examples, losses, make_model


def error_of(work) -> str | None:
    try:
        work()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def idle_adapter_model() -> lora.AdaptedModel:
    """A LoRA model trained with adapter a: adapter b is trainable and gets no gradient."""
    model = make_model()
    lora.add_adapters(model, ["a", "b"], rank=4, alpha=2.0, seed=0)
    return lora.AdaptedModel(model, "a")


IDLE_FIT = dict(steps=3, grad_accum=2, lr=1e-2)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    env = kt.init_distributed()
    assert env.world_size == 2, env
    fit = dict(lr=1e-2, save_every=2)
    results = {}

    kt.fit(make_model(), batches(), out / "straight", steps=4, **fit)
    node = out / f"node{env.rank}"
    node.mkdir(parents=True, exist_ok=True)
    os.chdir(node)
    kt.fit(make_model(), batches(), "run", steps=2, **fit)
    run = kt.fit(make_model(seed=5), batches(), "run", steps=4, **fit)  # rank 0 alone sees step-00000002
    results["resumed_step"] = run.step
    results["saved_schedule"] = saved_schedule("run")  # train-expanded's and bitune's resumed warmup read it
    if env.is_main:
        results["losses"] = losses(Path("run"))
        results["straight"] = losses(out / "straight")
    os.chdir(out)

    if env.is_main:
        kt.write_token_shards(out / "tokens", [list(range(3, 40))] * 8, vocab_size=67, eos_id=2, bos_id=1)
    torch.distributed.barrier()
    shards = kt.TokenShards(out / "tokens", seq_len=8, batch_size=4, rank=0, world_size=1)
    results["shards_error"] = error_of(lambda: kt.fit(make_model(), shards, out / "shards", steps=1, **fit))
    seeded = kt.Batches(examples(), 8, lambda ex: kt.collate_prompt_answer(ex, pad_id=0), seed=env.rank)
    results["seed_error"] = error_of(lambda: kt.fit(make_model(), seeded, out / "seeded", steps=1, **fit))
    other = {"steps": dict(steps=3 if env.is_main else 2, **fit), "lr": dict(steps=1, lr=1e-2 if env.is_main else 3e-2),
             "factory": dict(steps=1, optimizer=lambda m: kt.adamw(m, 1e-2 if env.is_main else 3e-2))}
    for name, kwargs in other.items():
        results[f"{name}_error"] = error_of(lambda: kt.fit(make_model(), batches(), out / f"{name}-apart", **kwargs))
    peeked = batches()
    if env.is_main:  # a look at a batch: fit restarts a new run's Batches, on every process
        next(iter(peeked))
    results["peeked_error"] = error_of(lambda: kt.fit(make_model(), peeked, out / "peeked", steps=2, **fit))
    if env.is_main and results["peeked_error"] is None:
        results["peeked_losses"] = losses(out / "peeked")

    class Unfreeze(kt.Callback):  # at step 2, as the docs advise for a parameter made trainable
        def on_batch(self, run, batch):
            if run.step == 1:
                run.model.embed_tokens.weight.requires_grad_(True)
                run.reset_optimizer()
            return batch

    class EmbeddingGroup(kt.Callback):
        def on_fit_start(self, run):
            run.model.embed_tokens.weight.requires_grad_(True)
            run.optimizer.add_param_group({"params": [run.model.embed_tokens.weight], "lr": 1e-3})

    for name, callback in (("unfreeze_error", Unfreeze()), ("group_error", EmbeddingGroup())):
        model = make_model()
        model.embed_tokens.weight.requires_grad_(False)
        results[name] = error_of(lambda: kt.fit(model, batches(), out / name, steps=3, callbacks=[callback], **fit))

    holder = None
    if env.is_main:  # another run holds the directory: rank 0 is refused, and the others hear of it
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kpro._run_lock import holding\n"
                                   "with holding(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
                                   str(out / "held")], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "held\n"
    torch.distributed.barrier()
    results["held_error"] = error_of(lambda: kt.fit(make_model(), batches(), out / "held", steps=1, **fit))
    if holder is not None:
        holder.kill()
        holder.wait()

    for mode in ("ddp", "fsdp"):  # DDP starts every process from rank 0's weights: so must FSDP2
        kt.fit(make_model(seed=env.rank), batches(), out / f"{mode}-seeded", steps=1, parallel=mode, **fit)

    adapted, idle_runs = idle_adapter_model(), []
    results["idle_error"] = error_of(lambda: idle_runs.append(kt.fit(adapted, batches(), out / "idle", **IDLE_FIT)))
    torch.save(adapted.state_dict(), out / f"idle-rank{env.rank}.pt")
    if idle_runs:
        state = idle_runs[0].optimizer.state
        results["idle_stateless"] = sum(p not in state for p in adapted.parameters() if p.requires_grad)

    def late_use(model, batch):  # adapter b's first weight joins the loss at step 2, outside DDP's reduction
        out = kt.lm_loss(model, batch)
        calls.append(None)
        return kt.LossSum(out.total + 0 * late.sum(), out.count) if len(calls) > 1 else out
    adapted, calls = idle_adapter_model(), []
    late = next(p for name, p in adapted.named_parameters() if ".b.lora_A." in name)
    results["late_use_error"] = error_of(lambda: kt.fit(adapted, batches(), out / "late", steps=2, loss_fn=late_use,
                                                        lr=1e-2))

    own_rows = DataLoader(examples(), batch_size=8, sampler=DistributedSampler(examples(), shuffle=False),
                          collate_fn=lambda rows: kt.collate_prompt_answer(rows, pad_id=0))
    results["sampler_error"] = error_of(lambda: kt.fit(make_model(), own_rows, out / "sampler", steps=2, **fit))

    class OnRank0(kt.Callback):  # early stopping on rank 0's evaluation, say
        def __init__(self, request):
            self.request = request

        def on_step_end(self, run, metrics):
            if run.is_main and run.step == 1:
                getattr(run, self.request)()

    class StopOnRank0AtStart(kt.Callback):  # an early stop that rank 0's restored state remembers, say
        def on_fit_start(self, run):
            if run.is_main:
                run.stop()

    for request, callback in (("stop", OnRank0("stop")), ("save_checkpoint", OnRank0("save_checkpoint")),
                              ("stop_at_start", StopOnRank0AtStart())):
        runs = []
        results[f"{request}_error"] = error_of(lambda: runs.append(kt.fit(
            make_model(), batches(), out / request, steps=3, callbacks=[callback], **fit)))
        results[f"{request}_step"] = runs[0].step if runs else None

    model = make_model()
    optimizer = kt.adamw(model, 1e-2)
    wrapped = DistributedDataParallel(model)
    kt.lm_loss(wrapped, next(iter(batches()))).mean.backward()
    optimizer.step()
    if env.is_main:
        torch.save(model.state_dict(), out / "own-weights.pt")

    def save_and_load():
        saved = kt.save_checkpoint(out / "own", 1, wrapped, optimizer)
        other = make_model(seed=5)
        kt.load_checkpoint(saved, DistributedDataParallel(other), kt.adamw(other, 1e-2))
        return max((a - b).abs().max().item() for a, b in zip(other.state_dict().values(),
                                                               model.state_dict().values()))
    results["own_error"] = error_of(lambda: results.update(own_loaded_difference=save_and_load()))

    valid = [parse_line(line) for line in multiplication_training_set(3, 2, seed=9)]
    accuracy = ValidationAccuracy(multiplication_tokenizer(), valid, every=1)
    results["valid_fsdp_error"] = error_of(lambda: kt.fit(make_model(), batches(), out / "valid-fsdp", steps=1,
                                                          parallel="fsdp", callbacks=[accuracy], **fit))
    sharded = kt.shard_blocks(make_model())
    results["generate_fsdp_error"] = error_of(lambda: kpro.generate(sharded, torch.tensor([[1, 5, 6]]), 2))

    (out / f"checks-rank{env.rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
