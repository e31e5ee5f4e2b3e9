"""fit under torchrun with 2 gloo processes on the CPU, DDP and FSDP2, against one process: the same global
batches give the same losses and weights (within fp32 rounding), and checkpoints cross-load both ways."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kpro
from kpro import train as kt

from _dist_checks import IDLE_FIT, idle_adapter_model
from _dist_fit import FIT, FIT_ACCUM, TIED
from _dist_merged import MERGED_FIT, merged_model
from test_train_fit import batches, examples, losses, make_model, one_thread  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    model = make_model()
    kt.fit(model, batches(), single, **FIT)
    accum = make_model(**TIED)
    kt.fit(accum, batches(), single / "accum", **FIT_ACCUM)
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "_dist_fit.py"), str(out), str(single)]
    # SIGINT as in a terminal: a shell starts background jobs (CI runners among them) with it ignored, and
    # torchrun's workers inherit that; with it ignored, rank 0 was seen to abort at exit (not yet understood).
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return single, model, out, done.stderr, accum  # the progress, on stderr


def torchrun(script, *args, timeout=400, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def assert_close_losses(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5)


def assert_close_models(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, mode):
    single, model, out, progress, _ = runs
    assert_close_losses(losses(out / mode / "run"), losses(single))
    grad_norms = [r["grad_norm"] for r in kt.read_metrics(out / mode / "run" / "metrics.jsonl")]
    assert grad_norms == pytest.approx([r["grad_norm"] for r in kt.read_metrics(single / "metrics.jsonl")], rel=1e-5)
    # The sharded run's checkpoint is an ordinary full HF-layout model.
    assert_close_models(kpro.load_pretrained(out / mode / "run" / "step-00000004"), model)
    assert progress.count("step     4/4") == 4  # rank 0 alone prints: 2 modes x 2 runs of 4 steps


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoints_cross_load(runs, mode, tmp_path):
    single, model, out, _, _ = runs
    # one process -> two: resumed from the single-process checkpoint at step 2
    assert_close_losses(losses(out / mode / "resumed"), losses(single)[2:])
    assert_close_models(kpro.load_pretrained(out / mode / "resumed" / "step-00000004"), model)
    # two processes -> one: resume the 2-process checkpoint of step 2 here, optimizer state included
    resumed = make_model(seed=3)
    kt.fit(resumed, batches(), tmp_path, resume=out / mode / "run" / "step-00000002", **FIT)
    assert_close_losses(losses(tmp_path), losses(single)[2:])
    assert_close_models(resumed, model)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_accumulation_adamw_and_tied_embeddings_match_one_process(runs, mode):
    single, _, out, _, accum = runs
    assert_close_losses(losses(out / mode / "accum"), losses(single / "accum"))
    loaded = kpro.load_pretrained(out / mode / "accum" / "step-00000003")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_close_models(loaded, accum)


def test_save_pretrained_of_a_sharded_model_is_a_full_checkpoint(runs):
    _, model, out, _, _ = runs
    assert_close_models(kpro.load_pretrained(out / "fsdp" / "saved"), model)


def test_ctrl_c_under_torchrun_saves_on_every_rank_and_the_same_command_resumes(runs, tmp_path):
    """Ctrl-C in a terminal reaches torchrun, which forwards it to both workers: all stop after the same step with
    one checkpoint, rank 0 alone saying so, and running the command again finishes the run as if never
    interrupted."""
    single = runs[0]
    first = torchrun("_dist_interrupt.py", tmp_path, start_new_session=True)
    assert first.returncode != 0, first.stdout[-2000:]
    assert first.stderr.count("Ctrl-C: stopping after this step") == 1, first.stderr[-3000:]  # rank 0's, not each's
    assert kt.latest_checkpoint(tmp_path / "run").name == "step-00000003", first.stderr[-3000:]
    second = torchrun("_dist_interrupt.py", tmp_path, start_new_session=True)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "resumed from" in second.stderr  # with the progress, on stderr
    assert_close_losses(losses(tmp_path / "run"), losses(single))


def run_and_read_ranks(tmp_path_factory, name: str):
    """tests/_dist_NAME.py run on 2 processes; its directory and each rank's NAME-rankR.json."""
    out = tmp_path_factory.mktemp(name)
    done = torchrun(f"_dist_{name}.py", out, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out, [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return run_and_read_ranks(tmp_path_factory, "checks")


def test_rank_0_alone_finds_the_checkpoint_to_resume(checks):
    """Nodes without a shared file system: only rank 0 sees out_dir's checkpoints. Every process resumed
    from it (the others started afresh before, and waited in another collective than rank 0's for ever)."""
    out, results = checks
    assert [r["resumed_step"] for r in results] == [4, 4]
    assert results[0]["saved_schedule"]["kind"] == "constant" and results[1]["saved_schedule"] == results[0]["saved_schedule"]
    assert not (out / "node1" / "run").exists()
    assert_close_losses(results[0]["losses"], results[0]["straight"])


def test_data_told_apart_by_rank_is_refused_on_every_process(checks):
    """A TokenShards given another rank and world size than the process group's, or a Batches seeded by rank:
    rows trained twice or never (silently before). Every process raises, none waits."""
    _, results = checks
    for r in results:
        assert "process 1 takes the rows of process 0 of 1" in r["shards_error"], r["shards_error"]
        assert "seed: 0 on process 0, 1 on process 1" in r["seed_error"], r["seed_error"]


def test_fit_settings_that_differ_between_processes_are_refused_on_every_process(checks):
    """Another steps on one process left every process waiting in a collective until the group timed out; another
    lr (fit's, or in the optimizer factory) trained the replicas apart, silently. Every process raises, naming it."""
    _, results = checks
    for r in results:
        assert r["steps_error"].startswith("ValueError: the 2 processes were given different fit settings"), r
        assert "steps: 3 on process 0, 2 on process 1" in r["steps_error"], r["steps_error"]
        assert "lr: 0.01 on process 0, 0.03 on process 1" in r["lr_error"], r["lr_error"]
        assert "optimizer param group 0 peak_lr: 0.01 on process 0, 0.03 on process 1" in r["factory_error"], \
            r["factory_error"]


def test_a_batches_looked_at_on_one_process_is_restarted_not_refused(checks):
    """Rank 0 took a batch before a new run: the processes' Batches differed in position only, which fit resets
    (restart()), and the run was refused as data told apart by rank."""
    _, results = checks
    assert [r["peeked_error"] for r in results] == [None, None]
    assert_close_losses(results[0]["peeked_losses"], results[0]["straight"][:2])


def test_a_parameter_made_trainable_under_ddp_is_refused_on_every_process(checks):
    """DDP reduces the gradients of the parameters trainable when it wrapped the model: the embedding unfrozen
    mid-run trained apart on each process, silently."""
    _, results = checks
    for r in results:
        for key in ("unfreeze_error", "group_error"):  # at run.reset_optimizer(), and at the next step
            assert r[key].startswith("ValueError: the parameters that train changed after DDP wrapped the model at "
                                     "the start of fit (made trainable since: embed_tokens.weight)"), r[key]
            assert "set requires_grad before calling fit" in r[key] and "parallel='fsdp'" in r[key], r[key]


def test_a_run_directory_in_use_is_refused_on_every_process(checks):
    """Rank 0 alone holds out_dir: it was refused, and the other process waited in the next collective until the
    group timed out."""
    _, results = checks
    assert results[0]["held_error"].startswith("DirectoryInUse: ") and "is in use by another kpro run" in \
        results[0]["held_error"]
    assert results[1]["held_error"].startswith("CheckpointError: rank 0 could not hold ") and \
        "DirectoryInUse: " in results[1]["held_error"]


def test_fsdp_starts_every_process_from_rank_0s_weights_as_ddp_does(checks):
    """Models initialised with a seed per rank: fully_shard kept each rank's slice of its own model, a stitched
    model, where DDP trains rank 0's."""
    out, _ = checks
    assert_close_models(kpro.load_pretrained(out / "fsdp-seeded" / "step-00000001"),
                        kpro.load_pretrained(out / "ddp-seeded" / "step-00000001"))


def test_a_trainable_parameter_without_gradient_trains_under_ddp_as_in_one_process(checks, tmp_path):
    """A second LoRA adapter, trainable and idle (as Bitune's only_causal, naive_bidir and no_mix modes leave
    some): DDP left its bucket unreduced, so step 1 stepped each process on its own gradients, and step 2 died
    with torch's advice to pass find_unused_parameters=True, which fit does not offer."""
    out, results = checks
    assert [r["idle_error"] for r in results] == [None, None]
    single = idle_adapter_model()
    run = kt.fit(single, batches(), tmp_path, **IDLE_FIT)
    stateless = sum(p not in run.optimizer.state for p in single.parameters() if p.requires_grad)
    assert stateless == 28 and [r["idle_stateless"] for r in results] == [stateless] * 2  # AdamW: none for adapter b
    for rank in range(2):
        state = torch.load(out / f"idle-rank{rank}.pt")
        for name, tensor in single.state_dict().items():
            torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_parameter_idle_at_the_first_step_and_used_later_is_refused_under_ddp(checks):
    _, results = checks
    for r in results:
        assert r["late_use_error"].startswith("ValueError: the trainable parameters that get no gradient changed "
                                              "after the first step under DDP, at step 2"), r["late_use_error"]
    assert "model.layers.0.self_attn.q_proj.b.lora_A.weight" in results[0]["late_use_error"]


def test_processes_passing_different_batches_are_refused_before_the_step(checks):
    """The usual DDP data pattern, a DataLoader with a DistributedSampler, gives each process its own rows: fit,
    which takes them as the global batch and splits it again, trained on half the rows without a word."""
    out, results = checks
    for r in results:
        assert r["sampler_error"].startswith("ValueError: the 2 processes passed different batches at step 1: fit "
                                             "expects the same global batches on every process"), r["sampler_error"]
        assert "a DataLoader with a DistributedSampler" in r["sampler_error"], r["sampler_error"]
    assert kt.latest_checkpoint(out / "sampler") is None


def test_the_batch_fingerprint_tells_apart_one_element_and_is_exact():
    from kpro.train.distributed import batch_fingerprint
    batch = kt.collate_prompt_answer(examples(8), pad_id=0)
    batch["scores"] = torch.linspace(0, 1, 8, dtype=torch.bfloat16)
    fingerprint = batch_fingerprint(batch)
    assert fingerprint.dtype == torch.int64 and 0 <= int(fingerprint) < 2 ** 20
    assert int(batch_fingerprint({key: value.clone() for key, value in reversed(batch.items())})) == int(fingerprint)
    for key, index in (("input_ids", (3, 2)), ("labels", (7, -1)), ("attention_mask", (0, 1)), ("scores", 5)):
        changed = {name: value.clone() for name, value in batch.items()}
        changed[key][index] += 1
        assert int(batch_fingerprint(changed)) != int(fingerprint), key
    assert int(batch_fingerprint({k: v[:4] for k, v in batch.items()})) != int(fingerprint)


def test_a_stop_or_save_asked_for_on_rank_0_alone_applies_to_every_process(checks):
    """Early stopping decided on rank 0's evaluation: rank 0 stopped (or saved, a collective) alone, and the
    other process waited in the next step's collective until the process group timed out (30 minutes). A stop
    asked for in on_fit_start on rank 0 alone ends the run before its first step on every process."""
    out, results = checks
    for r in results:
        assert (r["stop_error"], r["stop_step"]) == (None, 1), r["stop_error"]
        assert (r["save_checkpoint_error"], r["save_checkpoint_step"]) == (None, 3), r["save_checkpoint_error"]
        assert (r["stop_at_start_error"], r["stop_at_start_step"]) == (None, 0), r["stop_at_start_error"]
    assert kt.list_checkpoints(out / "stop_at_start") == []
    assert [p.name for p in kt.list_checkpoints(out / "stop")] == ["step-00000001"]
    assert [p.name for p in kt.list_checkpoints(out / "save_checkpoint")] == ["step-00000001", "step-00000002",
                                                                              "step-00000003"]


def test_a_ddp_wrapper_is_checkpointed_and_loaded_as_the_model_inside(checks):
    """Your own loop under DDP: save_checkpoint wrote the wrapper's `module.*` names as module.safetensors (not
    the HF layout) beside an optimizer.pt keyed by the model's own names, and nothing could load it."""
    out, results = checks
    for r in results:
        assert (r["own_error"], r.get("own_loaded_difference")) == (None, 0), r["own_error"]
    assert not (out / "own" / "step-00000001" / "module.safetensors").exists()
    weights = torch.load(out / "own-weights.pt")
    for name, tensor in kpro.load_pretrained(out / "own" / "step-00000001").state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0, msg=name)


def test_evaluating_a_sharded_model_on_one_process_is_refused_by_name(checks):
    """ValidationAccuracy (rank 0 evaluates) in an FSDP run, and kpro.generate of a sharded model, failed in torch
    ("aten.embedding.default: got mixed torch.Tensor and DTensor"), the other process with a connection reset."""
    out, results = checks
    for r in results:
        assert r["valid_fsdp_error"].startswith("ValueError: ValidationAccuracy evaluates on rank 0 alone, and needs "
                                                "a whole model there"), r["valid_fsdp_error"]
        assert "parallel='ddp'" in r["valid_fsdp_error"], r["valid_fsdp_error"]
        assert r["generate_fsdp_error"].startswith("ValueError: generate() takes a whole model, and this one is "
                                                   "sharded across processes"), r["generate_fsdp_error"]
    assert not (out / "valid-fsdp" / "metrics.jsonl").read_text().strip()  # refused before the first step


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return run_and_read_ranks(tmp_path_factory, "merged")


def test_a_merged_lora_model_trains_under_ddp_merged_as_on_rank_0(merged, tmp_path):
    """DDP's start-up broadcast copies rank 0's weights in place, which the merged layers read as their weight
    changed since the merge: the first forward was refused on every process. Each process now holds rank 0's
    merged weight and adapter, and is merged as rank 0 is: it trains as one process does, and unmerge() gives
    rank 0's base on every process (the other's own adapter would not)."""
    out, results = merged
    for r in results:
        assert (r["ddp_error"], r["unmerge_error"]) == (None, None), r["ddp_error"]
        assert r["unmerged_difference"] < 1e-5, r["unmerged_difference"]
    single = merged_model(seed=0)
    kt.fit(single, batches(), tmp_path, **MERGED_FIT)
    state = torch.load(out / "merged-ddp.pt")
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_merge_stale_on_rank_0_before_ddp_is_refused_on_every_process(merged):
    """A merged weight, or adapter, changed in place on rank 0 before fit: after the broadcast every process holds
    rank 0's, and refuses as rank 0 does; unmerge() then subtracts the update rank 0 merged, giving its base."""
    _, results = merged
    for r in results:
        assert "was changed in place after the merge" in (r["stale_error"] or ""), r["stale_error"]
        assert "was changed after it was merged into the weight" in (r["stale_adapter_error"] or ""), \
            r["stale_adapter_error"]
        assert r["stale_adapter_unmerge_error"] is None, r["stale_adapter_unmerge_error"]
        assert r["stale_adapter_unmerged_difference"] < 1e-5, r["stale_adapter_unmerged_difference"]


def test_ddp_refuses_models_merged_differently_on_every_process_by_name(merged):
    _, results = merged
    for r in results:
        assert r["apart_error"] == ("ValueError: LoRA layer layers.0.self_attn.v_proj has adapter 'a' merged on "
                                    "process 0 and no adapter merged on process 1 (1 layer(s) differ): merge the same "
                                    "adapters on every process before fit"), r["apart_error"]


def test_fsdp_refuses_a_merged_lora_model_up_front_by_name(merged):
    """FSDP2 replaces the parameters by shards and runs on gathered copies, which the merge record cannot follow:
    the first forward was refused with a message about a weight changed in place; now fit refuses before
    sharding, naming the layer and what to do, and the model is left as it was."""
    _, results = merged
    for r in results:
        for key in ("fsdp_error", "sharded_error"):
            assert r[key].startswith("ValueError: FSDP cannot train a model with a LoRA adapter merged"), r[key]
            assert "(layer layers.0.self_attn.q_proj, adapter 'a'" in r[key] and "unmerge()" in r[key], r[key]
            assert "save_pretrained" in r[key], r[key]
        assert r["fsdp_model_error"] is None, r["fsdp_model_error"]


def run_edge(out: Path, scenario: str) -> list[dict]:
    """tests/_dist_edges.py SCENARIO on 2 processes (a process group timing out after 20 s); each rank's result."""
    done = torchrun("_dist_edges.py", out, scenario, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(2)]


def test_batches_running_out_on_one_process_stop_every_process_with_a_checkpoint(tmp_path):
    """A plain iterable that ran out on rank 1 alone: rank 1 went into the save (a collective), rank 0 into the next
    step's, and both waited until the process group timed out (30 minutes), with no checkpoint. Each process now
    fetches the next step's batch before the processes agree on the step: all stop after the same step, save it,
    and raise, naming the process that ran out. The checkpoint holds each process's RNGs as they were before the
    batch fetched ahead."""
    results = run_edge(tmp_path, "uneven")
    for r in results:
        assert (r["error"] or "").startswith("ValueError: the batches ran out on process 1 (of 2) after 2 of steps=4 "
                                             f"(saved {tmp_path / 'run' / 'step-00000002'})"), r["error"]
    assert [p.name for p in kt.list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    saved = torch.load(tmp_path / "run" / "step-00000002" / "trainer_state.pt", weights_only=False)
    assert saved["data"]["steps"] == 2
    for rank in range(2):
        made = torch.load(tmp_path / f"uneven-rng-rank{rank}.pt")
        assert len(made) == (3 if rank == 0 else 2)  # rank 0 made the third batch ahead
        assert torch.equal(saved["rng"][rank]["torch"], made[1]), rank


@pytest.mark.parametrize("scenario", ["fsdp-shape", "fsdp-layers"])
def test_fsdp_refuses_processes_holding_different_models_on_every_process(scenario, tmp_path):
    """parallel='fsdp' broadcasts rank 0's tensors one by one: with another intermediate_size or layer count on rank 1
    gloo aborted one process ("Received data size doesn't match expected size"), the other losing its connection.
    Refused on every process before the broadcast, naming the first tensor that differs, as DDP does."""
    results = run_edge(tmp_path, scenario)
    first = {"fsdp-shape": "(22 parameters and buffers on process 0, 22 on process 1; the first that differs: "
                           "layers.0.mlp.gate_proj.weight, float32 [88, 48] on process 0, float32 [96, 48] on process 1)",
             "fsdp-layers": "(22 parameters and buffers on process 0, 31 on process 1; the first that differs: "
                            "layers.2.input_layernorm.weight, none on process 0, float32 [48] on process 1)"}
    for r in results:
        assert (r["error"] or "").startswith("ValueError: FSDP needs the same model on every process"), r["error"]
        assert first[scenario] in r["error"], r["error"]
        assert "build the same model on every process" in r["error"], r["error"]


def test_ddp_refuses_processes_holding_different_models_on_every_process(tmp_path):
    """DDP's own check failed in torch on one process ("RuntimeError: DDP expects same model across all ranks, but
    Rank 1 has ... params[2] sizes ..."), the other losing its connection (gloo "Connection closed by peer")."""
    for r in run_edge(tmp_path, "ddp-shape"):
        assert (r["error"] or "").startswith("ValueError: DDP needs the same model on every process"), r["error"]
        assert "the first that differs: layers.0.mlp.gate_proj.weight, float32 [88, 48] on process 0, float32 " \
               "[96, 48] on process 1" in r["error"], r["error"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_processes_training_different_parameters_are_refused_on_every_process(mode, tmp_path):
    """Rank 0 training block 0 and rank 1 block 1, of the same shapes: DDP averaged rank 0's gradients of one block
    with rank 1's of the other, and the run ended without a word, its model wrong."""
    for r in run_edge(tmp_path, f"trainable-{mode}"):
        assert (r["error"] or "").startswith("ValueError: the processes train different parameters (trainable on "
                                             "process 0 only: layers.0.input_layernorm.weight, "
                                             "layers.0.self_attn.q_proj.weight, layers.0.self_attn.k_proj.weight and "
                                             "6 more; on process 1 only: layers.1.input_layernorm.weight, "), r["error"]
        assert "set requires_grad alike on every process before fit" in r["error"], r["error"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_dataloader_whose_last_batch_cannot_be_split_is_refused_before_step_1(tmp_path):
    """A DataLoader(drop_last=False) of 15 examples in batches of 8: its last batch of 7 rows cannot be split between
    2 processes (or into 2 accumulation steps), which failed at the last step, with the steps before it unsaved. Now
    refused before the first step, on every process, as a kt.Batches of that kind is; not where steps= ends the run
    before that batch."""
    results = run_edge(tmp_path, "partial")
    for r in results:
        assert (r["error"] or "").startswith("ValueError: the DataLoader's last batch (step 2) holds 7 of its 15 "
                                             "examples (drop_last=False), which cannot be split into 2 micro-batches "
                                             "(processes x grad_accum)"), r["error"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    from torch.utils.data import DataLoader

    def loader(**kwargs):
        return DataLoader(examples(15), batch_size=8, collate_fn=lambda rows: kt.collate_prompt_answer(rows, pad_id=0),
                          **kwargs)
    with pytest.raises(ValueError, match=r"last batch \(step 2\) holds 7 of its 15 examples .* into 2 micro-batches"):
        kt.fit(make_model(), loader(), tmp_path / "accum", grad_accum=2, lr=1e-3)
    assert kt.fit(make_model(), loader(), tmp_path / "short", steps=1, grad_accum=2, lr=1e-3).step == 1
    assert kt.fit(make_model(), loader(drop_last=True), tmp_path / "dropped", grad_accum=2, lr=1e-3).step == 1


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory):
    from _dist_frozen import FROZEN_FIT, partly_frozen
    single = tmp_path_factory.mktemp("frozen-single")
    model = partly_frozen()
    kt.fit(model, batches(), single, save_frozen=False, **FROZEN_FIT)
    out = tmp_path_factory.mktemp("frozen-dist")
    done = torchrun("_dist_frozen.py", out, single)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return single, model, out, [json.loads((out / f"frozen-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoints_without_the_frozen_weights_match_one_process_and_cross_load(frozen_runs, mode, tmp_path):
    """fit(save_frozen=False) under DDP and FSDP2: the checkpoints hold the trained weights alone (gathered from the
    shards), the runs match one process, and checkpoints resume both ways onto models whose trained weights start
    elsewhere (the checkpoint replaces them) and whose frozen ones are the run's (kept)."""
    from _dist_frozen import FROZEN, FROZEN_FIT, partly_frozen
    single, model, out, _ = frozen_runs
    saved = load_file(out / mode / "run" / "step-00000004" / "module.safetensors")
    assert set(saved) == {name for name in model.state_dict() if not name.startswith(FROZEN)}
    assert_close_losses(losses(out / mode / "run"), losses(single))
    assert_close_losses(losses(out / mode / "resumed"), losses(single)[2:])
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    resumed = partly_frozen(shift=0.5)
    kt.fit(resumed, batches(), tmp_path, save_frozen=False, resume=out / mode / "run" / "step-00000002", **FROZEN_FIT)
    assert_close_losses(losses(tmp_path), losses(single)[2:])
    assert_close_models(resumed, model)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_resume_onto_other_frozen_weights_is_refused_on_every_process(frozen_runs, mode):
    _, _, _, results = frozen_runs
    for r in results:
        assert r[mode] is not None and "differ from the run's in embed_tokens.weight, layers.0." in r[mode], r[mode]


def test_the_batch_fingerprint_tells_apart_rows_in_another_order():
    """Processes that shuffled the same rows with different seeds hold the same values in another order."""
    from kpro.train.distributed import batch_fingerprint
    ids = torch.arange(24).view(4, 6)
    batch = {"input_ids": ids, "labels": ids.clone()}
    swapped = {key: value[[1, 0, 2, 3]] for key, value in batch.items()}
    assert int(batch_fingerprint(swapped)) != int(batch_fingerprint(batch))


# Mutation round 12
def test_local_rank_is_torchruns_local_rank_not_the_global_rank(tmp_path, monkeypatch):
    """on a second node RANK=4 but LOCAL_RANK=0: the device index is the local one."""
    import torch.distributed as dist
    from kpro.distributed import current_env
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert current_env().local_rank == 0
    finally:
        dist.destroy_process_group()
