"""`python -m kpro`: start-up without torch, help texts and defaults, the same device default everywhere,
one-line errors (a closed pipe, a diverged run), and runs that more --steps extend."""
import argparse
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kpro
from kpro import cli
from kpro.cli import main
from kpro.train import read_metrics
from conftest import randomize_norms, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ALPHABET = "abcdefgh \n"


def write_checkpoint(directory, dtype=torch.float32, tokenizer=ALPHABET, **overrides):
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(**{"vocab_size": 3 + len(ALPHABET), "max_position_embeddings": 64, **overrides}))
    randomize_norms(model, torch.Generator().manual_seed(1))
    kpro.save_pretrained(model.to(dtype), directory)
    kpro.CharTokenizer(tokenizer).save(directory)
    return model


def run_kpro(*args, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "kpro", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------------ start-up

TORCH_FREE = """
import runpy, sys
sys.argv = ["kpro", *sys.argv[1:]]
try:
    runpy.run_module("kpro", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("torch imported:", "torch" in sys.modules, "exit:", code, file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["info", "CHECKPOINT"], []], ids=["help", "info", "no-command"])
def test_help_and_info_do_not_import_torch(tmp_path, args):
    """`python -m kpro --help` and `info` (headers only) start without torch, which took seconds."""
    write_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    args = [str(tmp_path / "ck") if a == "CHECKPOINT" else a for a in args]
    result = subprocess.run([sys.executable, "-c", TORCH_FREE, *args], capture_output=True, text=True, cwd=ROOT)
    assert "torch imported: False" in result.stderr, result.stderr
    if args[:1] == ["info"]:
        assert "exit: 0" in result.stderr and "parameters   " in result.stdout
        assert "dtype        BF16 (100%)" in result.stdout and "tokenizer    kpro_char_tokenizer.json" in result.stdout


def test_the_command_table_matches_the_parsers():
    """COMMANDS (which --help lists without importing the method packages) names every subcommand the
    packages define, with their own help lines; `info` lists the tokenizer files kpro reads."""
    full = cli.build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(cli.COMMANDS)
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert helps == {name: help for name, (_, help) in cli.COMMANDS.items()}
    assert cli.TOKENIZER_FILES == kpro.tokenizer.TOKENIZER_FILES
    for name in cli.COMMANDS:  # each command's own parser: the same options as in the full one
        only = next(a for a in cli.build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        assert [a.dest for a in only.choices[name]._actions] == [a.dest for a in sub.choices[name]._actions]


def subcommand_options():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action) for name, parser in sub.choices.items() for action in parser._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)]


def test_every_option_has_help_and_shows_its_default():
    formatter = cli.HelpFormatter("kpro")
    missing, no_default = [], []
    for name, action in subcommand_options():
        flag = f"{name} {action.option_strings[-1]}"
        if not action.help:
            missing.append(flag)
        elif not (action.required or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                  or "default" in formatter._get_help_string(action).lower()):
            no_default.append(flag)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help shows no default: {no_default}"
    flags = [f"{name} {action.option_strings[-1]}" for name, action in subcommand_options()
             if action.nargs == 0 and formatter._get_help_string(action) != action.help]
    assert not flags, f"flags whose help shows a default (--no-save-frozen's read 'default: True'): {flags}"


def test_every_device_option_defaults_to_auto():
    devices = {name: action.default for name, action in subcommand_options() if action.dest == "device"}
    assert {"generate", "train-expanded", "internalize", "bitune"} <= set(devices)
    assert set(devices.values()) == {"auto"}, devices


# ------------------------------------------------------------------------------------------ errors

def test_a_command_leaves_the_process_group_it_joined(monkeypatch):
    """Under torchrun a command joins a process group (init_distributed); main leaves it before returning, on
    success and on an error, since a rank exiting with its gloo group up was seen to abort at teardown. A group
    the caller had joined before calling main is the caller's, and stays."""
    import torch.distributed as dist

    def join(args, fail=False):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        if fail:
            raise ValueError("a bad flag")

    def command(run):
        parser = argparse.ArgumentParser()
        parser.set_defaults(command="fake", run=run)
        monkeypatch.setattr(cli, "build_parser", lambda command="": parser)

    command(join)
    assert main([]) == 0 and not dist.is_initialized()
    command(lambda args: join(args, fail=True))
    assert main([]) == 1 and not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the caller's
    try:
        command(lambda args: None)
        assert main([]) == 0 and dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_a_peer_gone_under_torchrun_is_one_line_not_a_traceback(monkeypatch, capsys):
    """Under torchrun, one process failing early (its --data missing on its node) left the other in a collective,
    which raised gloo's "Connection closed by peer" with a traceback beside the first process's clear line. Now
    one line that sends the reader to the other process's error; outside a process group the error is not taken
    for that, and stays a traceback."""
    import torch.distributed as dist

    gloo = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:39107. "
            "This is typically caused by a remote worker crashing.")

    def collective(args):
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        raise RuntimeError(gloo)

    parser = argparse.ArgumentParser()
    parser.set_defaults(command="fake", run=collective)
    monkeypatch.setattr(cli, "build_parser", lambda command="": parser)
    assert main([]) == 1 and not dist.is_initialized()
    assert capsys.readouterr().err == ("error: another process of this torchrun run ended, so this one cannot go on: "
                                       f"its own error says why ({gloo})\n")
    parser.set_defaults(run=lambda args: (_ for _ in ()).throw(RuntimeError(gloo)))  # no process group
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main([])


@pytest.mark.parametrize("rank, printed", [(None, "interrupted\n"), ("0", "interrupted\n"), ("1", "")])
def test_ctrl_c_is_reported_by_rank_0_alone(monkeypatch, capsys, rank, printed):
    """Under torchrun the terminal's Ctrl-C reaches every process: each printed "interrupted"."""
    from kpro.train import command

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(command, "cmd_tokenize", interrupted)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)  # as torchrun sets it
    else:
        monkeypatch.delenv("RANK", raising=False)
    assert main(["tokenize", "--tokenizer", ".", "--data", ".", "--out", "o"]) == 130
    assert capsys.readouterr().err == printed


@pytest.mark.parametrize("stop", ["sigterm", "sighup", "said"])
def test_sigterm_stops_any_command_as_ctrl_c_and_a_said_stop_is_not_said_twice(monkeypatch, capsys, stop,
                                                                                sighup_default):
    """SIGTERM (timeout, a scheduler) ended commands other than training and tokenize at once, exit 143, no line
    printed, the temporaries of a save in progress left behind; a training's stop printed "interrupted: saved ...",
    then the command line a second, bare "interrupted"."""
    import signal

    from kpro.errors import StoppedAndSaid
    from kpro.train import command

    def stopped(args):
        if stop == "said":
            print("interrupted: saved x; run again to resume", file=sys.stderr)
            raise StoppedAndSaid
        signal.raise_signal(signal.SIGHUP if stop == "sighup" else signal.SIGTERM)
        time.sleep(5)  # not reached: the handler raises at once
    monkeypatch.setattr(command, "cmd_tokenize", stopped)
    monkeypatch.delenv("RANK", raising=False)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    assert main(["tokenize", "--tokenizer", ".", "--data", ".", "--out", "o"]) == 130
    assert capsys.readouterr().err == ("interrupted: saved x; run again to resume\n" if stop == "said"
                                       else "interrupted\n")
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers  # called in-process: restored


@pytest.mark.parametrize("signame, swallowed", [("SIGTERM", False), ("SIGHUP", False), ("SIGTERM", True)])
def test_a_notice_while_the_command_line_is_parsed_stops_as_ctrl_c(monkeypatch, capsys, signame, swallowed,
                                                                  sighup_default):
    """Parsing imports the command's modules and torch (1 to 3 seconds): a SIGTERM or SIGHUP then ended the
    process with status 143 or 129 and no line (the handler came after parsing). torch's import of numpy swallows
    an error raised inside it: the notice's KeyboardInterrupt was lost there, and the command ran on."""
    import signal

    import kpro.cli

    class EarlyNotice(Exception):
        pass

    def early(signum, frame):  # stands for the default action, which would end pytest itself
        raise EarlyNotice
    real = kpro.cli.build_parser

    def parser_receiving_a_notice(only=None):
        try:
            signal.raise_signal(getattr(signal, signame))
        except KeyboardInterrupt:
            if not swallowed:
                raise
        return real(only)
    monkeypatch.setattr(kpro.cli, "build_parser", parser_receiving_a_notice)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for signum in handlers:
            signal.signal(signum, early)
        assert main(["tokenize", "--tokenizer", ".", "--data", ".", "--out", "o"]) == 130
        assert capsys.readouterr().err == "interrupted\n"
        assert all(signal.getsignal(signum) is early for signum in handlers)  # called in-process: restored
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the tracker's signal mask from /proc")
def test_the_resource_tracker_of_a_pool_ignores_a_closed_terminal():
    """tokenize --workers and the demo's pools start multiprocessing's resource tracker in the command's process
    group: a closed terminal's SIGHUP killed it, and the stop ended in its leak warning and KeyError tracebacks."""
    code = """if True:
        import signal
        from multiprocessing import resource_tracker
        from kpro._signals import start_resource_tracker
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        start_resource_tracker()
        pid = resource_tracker._resource_tracker._pid
        masks = {line.split(":")[0]: int(line.split()[1], 16) for line in open(f"/proc/{pid}/status")
                 if line.startswith(("SigIgn:", "SigBlk:"))}
        mine = next(line for line in open("/proc/self/status") if line.startswith("SigBlk:"))
        print((masks["SigIgn"] | masks["SigBlk"]) >> (signal.SIGHUP - 1) & 1,
              int(mine.split()[1], 16) >> (signal.SIGHUP - 1) & 1, signal.getsignal(signal.SIGHUP) is signal.SIG_DFL)
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["1", "0", "True"], result.stderr  # the tracker keeps SIGHUP out; this process not


def test_a_stopped_program_ignores_further_notices_until_it_exits(sighup_default):
    """A second SIGTERM 50 ms after the first (timeout and SLURM send one to the process and one to its group)
    came as the stopped command printed its line and exited: status 143, not 130. The program (`python -m kpro`,
    main() without arguments) leaves the notices ignored after a stop; a block without a stop restores them."""
    import signal

    from kpro._signals import sigterm_as_ctrl_c
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with sigterm_as_ctrl_c(ignore_after_stop=True):
            pass
        assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
        with pytest.raises(KeyboardInterrupt):
            with sigterm_as_ctrl_c(ignore_after_stop=True):
                signal.raise_signal(signal.SIGTERM)
        assert all(signal.getsignal(signum) is signal.SIG_IGN for signum in handlers)
        signal.raise_signal(signal.SIGTERM)  # ignored: the test goes on
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m kpro info DIR | head -1` closes the pipe early: no BrokenPipeError traceback."""
    write_checkpoint(tmp_path / "ck")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        result = run_kpro("info", tmp_path / "ck", stdout=write)
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == 141


def test_training_into_a_closed_pipe_saves_the_steps_done(tmp_path):
    """`train-expanded ... | head -3` ended the run at step ~40 of 400 with nothing saved (exit status 141, not a
    word): the progress went to stdout. It goes to stderr now, stdout keeping the final line alone; and where the
    progress's own reader goes away (`2>&1 | head`), the steps done are saved, as on Ctrl-C."""
    write_checkpoint(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "ex"), "--blocks", "1"]) == 0
    (tmp_path / "corpus.txt").write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(8)))
    args = ["train-expanded", tmp_path / "ex", "--data", tmp_path / "corpus.txt", "--seq-len", "8", "--batch-size", "2",
            "--device", "cpu"]
    result = run_kpro(*args, "--steps", "3", "--out", tmp_path / "piped")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"saved the post-trained model to {tmp_path / 'piped' / 'final'}/ (a normal LLaMA " \
                            "checkpoint, with the tokenizer)\n"
    assert "step     3/3" in result.stderr and "trainable parameters" in result.stderr
    # `2>&1 | head`: the reader leaves after the first progress line
    process = subprocess.Popen([sys.executable, "-m", "kpro", *map(str, args), "--steps", "400", "--out",
                                tmp_path / "closed"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    while not process.stdout.readline().startswith("step "):
        pass
    process.stdout.close()
    assert process.wait(timeout=300) == 141
    steps = [record["step"] for record in read_metrics(tmp_path / "closed" / "metrics.jsonl")]
    assert steps and steps[-1] < 400 and (tmp_path / "closed" / f"step-{steps[-1]:08d}").is_dir()


def test_a_checkpoint_without_a_tokenizer_is_refused_before_its_weights_load(tmp_path, capsys, monkeypatch):
    """generate and bitune loaded the whole model, then found no tokenizer beside it (train-expanded looked first)."""
    import kpro.checkpoint
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "kpro_char_tokenizer.json").unlink()
    (tmp_path / "inst.jsonl").write_text('{"instruction": "ab", "response": "cd"}\n')
    monkeypatch.setattr(kpro.checkpoint, "load_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    for args in (["generate", str(tmp_path / "ck"), "--prompt", "ab", "--device", "cpu"],
                 ["bitune", "--model", str(tmp_path / "ck"), "--data", str(tmp_path / "inst.jsonl"), "--device", "cpu",
                  "--out", str(tmp_path / "o")]):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'ck'} holds no tokenizer.model, tokenizer.json") and \
            err.count("\n") == 1, err
        # what to do: save_pretrained and fit's checkpoints write no tokenizer
        assert err.endswith(f"copy the tokenizer of the model it came from: kpro.load_tokenizer(BASE)"
                            f".save({str(tmp_path / 'ck')!r})\n"), err
    # expand of such a checkpoint does not suggest a train-expanded that cannot run, even where it copies other
    # files (it did on a generation_config.json)
    (tmp_path / "ck" / "generation_config.json").write_text('{"eos_token_id": 2}')
    assert main(["expand", str(tmp_path / "ck"), str(tmp_path / "big"), "--blocks", "1"]) == 0
    out = capsys.readouterr().out
    assert "; copied generation_config.json; no tokenizer found to copy" in out and \
        "next: python -m kpro train-expanded" not in out and \
        out.endswith(f"next: copy the source model's tokenizer into {tmp_path / 'big'} (kpro.load_tokenizer(BASE)"
                     f".save({str(tmp_path / 'big')!r})), which train-expanded tokenizes its corpus with\n"), out
    # --chat on a checkpoint without a chat template: refused before the weights load, by the flag
    kpro.CharTokenizer(ALPHABET).save(tmp_path / "ck")
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "ab", "--chat", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == "error: --chat: this CharTokenizer has no chat template (a checkpoint keeps it " \
                                      "in tokenizer_config.json as \"chat_template\", or in chat_template.jinja)\n"
    # a directory that is no checkpoint is named as such, not for its missing tokenizer
    (tmp_path / "notes").mkdir()
    assert main(["generate", str(tmp_path / "notes"), "--prompt", "ab", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: no config.json at {tmp_path / 'notes' / 'config.json'}\n"


def test_generate_prints_the_seed_it_drew_and_a_larger_tokenizer_is_refused(tmp_path, capsys):
    write_checkpoint(tmp_path / "ck")
    args = ["generate", str(tmp_path / "ck"), "--prompt", "abc", "--max-new-tokens", "3", "--device", "cpu"]
    assert main(args + ["--temperature", "1.0"]) == 0
    first = capsys.readouterr()
    seed = int(first.err.split("sampling with --seed ")[1].split()[0])
    assert main(args + ["--temperature", "1.0", "--seed", str(seed)]) == 0  # the printed seed repeats the sample
    again = capsys.readouterr()
    assert again.out == first.out and "sampling with" not in again.err
    assert main(args) == 0 and "--seed" not in capsys.readouterr().err  # greedy: nothing to repeat
    assert main(args + ["--temperature", "1.0", "--top-k", "0"]) == 1  # refused before a seed is drawn and printed
    err = capsys.readouterr().err
    assert "--top-k must be a positive integer" in err and "--seed" not in err, err
    kpro.CharTokenizer(ALPHABET + "ijklmnop").save(tmp_path / "ck")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has 21 tokens but the model only 13 embeddings" in err and \
        err.count("\n") == 1, err
    (tmp_path / "inst.jsonl").write_text('{"instruction": "ab", "response": "cd"}\n')
    assert main(["bitune", "--model", str(tmp_path / "ck"), "--data", str(tmp_path / "inst.jsonl"), "--device", "cpu",
                 "--out", str(tmp_path / "o")]) == 1
    assert "has 21 tokens but the model only 13 embeddings" in capsys.readouterr().err


def test_generate_prints_what_it_generated_up_to_its_stop_ids_only(tmp_path, capsys):
    """The command also cut its printed text at the tokenizer's eos, where generation (stopping at
    generation_config.json's ids, as transformers') had run on: the text was shorter than what was generated."""
    model = write_checkpoint(tmp_path / "ck")
    tok = kpro.load_tokenizer(tmp_path / "ck")
    for text in ("".join(letters) for letters in itertools.product("abcdefgh", repeat=2)):
        prompt = tok.encode(text)
        new = kpro.generate(model, torch.tensor([prompt]), 12, eos_token_id=[])[0, len(prompt):].tolist()
        special = {tok.eos_id, tok.bos_id, tok.pad_id}
        if tok.eos_id in new:  # a stop after the eos, with text between them that the old cut dropped
            e = new.index(tok.eos_id)
            stop = next((t for j, t in enumerate(new) if j > e + 1 and t not in new[:j] and t not in special
                         and set(new[e + 1:j]) - special), None)
            if stop is not None:
                break
    else:
        pytest.fail("no prompt generates the tokenizer's eos and then a new token")
    (tmp_path / "ck" / "generation_config.json").write_text(f'{{"eos_token_id": [{stop}]}}')
    assert main(["generate", str(tmp_path / "ck"), "--prompt", text, "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == tok.decode(prompt + new[:new.index(stop)]) + "\n"


def test_generate_names_an_id_the_tokenizer_lacks_after_printing_the_text_before_it(tmp_path, capsys):
    """A model with more embeddings than its tokenizer has tokens (common in released checkpoints) generated
    an id the tokenizer lacks, and the command failed with "ids[5] = 45 is outside the vocabulary", printing
    nothing."""
    model = write_checkpoint(tmp_path / "ck", vocab_size=64)
    tok = kpro.load_tokenizer(tmp_path / "ck")
    prompt = tok.encode("abc")
    new = kpro.generate(model, torch.tensor([prompt]), 8)[0, len(prompt):].tolist()  # to config.json's eos
    first = next(i for i, t in enumerate(new) if t >= tok.vocab_size)  # seed 0's weights reach one, before any eos
    assert not set(new[:first]) & set(model.config.eos_token_ids)
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "abc", "--max-new-tokens", "8", "--device", "cpu",
                 ]) == 1
    printed = capsys.readouterr()
    assert printed.out == tok.decode(prompt + new[:first]) + "\n"
    assert f"prompt 1 generated id {new[first]} after {first} tokens, which the tokenizer of" in printed.err
    assert f"(it has {tok.vocab_size} tokens, the model 64 embeddings)" in printed.err


def test_generate_stops_at_the_eos_ids_of_generation_config_json(tmp_path, capsys):
    """transformers' generate stops at generation_config.json's eos ids (Qwen2.5 Instruct lists one more than
    its config.json); the command read config.json's only and ran on past them."""
    model = write_checkpoint(tmp_path / "ck")
    tok = kpro.load_tokenizer(tmp_path / "ck")

    def until(ids, stops):
        return ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]

    for text in ("abc", "hg", "dab", "gfe", "ha", "cheb", "fade"):  # one whose third new token is no eos
        prompt = tok.encode(text)
        continuation = kpro.generate(model, torch.tensor([prompt]), 6, eos_token_id=[])[0, len(prompt):].tolist()
        if tok.eos_id not in continuation[:3]:
            break
    stop = continuation[2]
    args = ["generate", str(tmp_path / "ck"), "--prompt", text, "--max-new-tokens", "6", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out == tok.decode(prompt + until(continuation, {tok.eos_id})) + "\n"
    (tmp_path / "ck" / "generation_config.json").write_text(f'{{"eos_token_id": [{stop}]}}')
    assert main(args) == 0
    cut = until(continuation, {stop})
    assert len(cut) <= 2 and capsys.readouterr().out == tok.decode(prompt + cut) + "\n"
    (tmp_path / "ck" / "generation_config.json").write_text('{"eos_token_id": 99}')
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "generation_config.json: eos_token_id=99 is not a token id" in err, err


def test_what_is_no_checkpoint_is_named_for_what_it_is(tmp_path, capsys):
    """A training run's directory, a bitune run's, its adapters, each said "no config.json at ..."; a GGUF file was
    "a file", and generate pointed at the folder holding it ("load_pretrained takes the checkpoint directory ...
    (its parent)"), which is no checkpoint. Each is named now, with what to pass instead."""
    run, bitune_run, gguf = tmp_path / "run", tmp_path / "bt", tmp_path / "m.gguf"
    for step in ("step-00000002", "step-00000010"):
        write_checkpoint(run / step)
    (bitune_run / "adapters").mkdir(parents=True)
    (bitune_run / "adapters" / "adapter_config.json").write_text("{}")
    gguf.write_bytes(b"GGUF" + bytes(20))
    (tmp_path / "notes.txt").write_text("x")
    adapters = ("load onto the base model they were tuned from: kpro.bitune.load_tuned(kpro.load_pretrained(BASE), "
                f"'{bitune_run / 'adapters'}') (docs/bitune.md)")
    cases = [(run, f"{run} is a training run's directory, not a checkpoint: pass its newest checkpoint, "
                   f"{run / 'step-00000010'}"),
             (bitune_run, f"{bitune_run} is a bitune run's directory, not a checkpoint: its adapters, "
                          f"{bitune_run / 'adapters'}, {adapters}"),
             (bitune_run / "adapters", f"{bitune_run / 'adapters'} holds adapters (adapter_config.json), not a "
                                       f"model: they {adapters}"),
             (gguf, f"{gguf} is a GGUF file, not a checkpoint directory: convert it first, python -m kpro "
                    f"convert-gguf {gguf} OUT"),
             (tmp_path / "notes.txt", f"{tmp_path / 'notes.txt'} is a file, not a checkpoint directory")]
    for path, message in cases:
        for args in (["info", str(path)], ["generate", str(path), "--prompt", "a", "--device", "cpu"]):
            assert main(args) == 1
            assert capsys.readouterr().err == f"error: {message}\n", args
        with pytest.raises(Exception, match=re.escape(message if path != tmp_path / "notes.txt" else
                                                      f"{path} is a file; load_pretrained takes the checkpoint "
                                                      "directory that holds config.json and the weights")) as raised:
            kpro.load_pretrained(path)
        assert str(tmp_path) + ")" not in str(raised.value)  # the folder holding it is no checkpoint: not suggested
    write_checkpoint(run / "final")
    assert main(["info", str(run)]) == 1
    assert capsys.readouterr().err == f"error: {run} is a training run's directory, not a checkpoint: pass " \
                                      f"{run / 'final'}, its final model\n"
    # a file inside a checkpoint: the checkpoint is named
    assert main(["info", str(run / "final" / "config.json")]) == 1
    assert capsys.readouterr().err == f"error: {run / 'final' / 'config.json'} is a file, not a checkpoint " \
                                      f"directory: pass {run / 'final'}, the checkpoint holding it\n"


def test_expand_refuses_its_source_as_destination_or_a_directory_inside_it(tmp_path, capsys):
    write_checkpoint(tmp_path / "src")
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    for dst, what in ((tmp_path / "src", "is the source"), (tmp_path / "src" / "big", "is inside the source"),
                      (tmp_path, "holds the source")):
        assert main(["expand", str(tmp_path / "src"), str(dst), "--blocks", "1", "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: the destination") and what in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before


def test_paths_of_the_wrong_kind_are_named(tmp_path, capsys):
    """`info` on a file said the directory did not exist; a tokenizer directory that does not exist was said to
    hold no tokenizer file; a char tokenizer file cut short or holding a list gave a bare JSON message or a
    traceback."""
    (tmp_path / "corpus.txt").write_text("abc\n")
    assert main(["info", str(tmp_path / "corpus.txt")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'corpus.txt'} is a file, not a checkpoint directory\n"
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .*nope does not exist"):
        kpro.load_tokenizer(tmp_path / "nope")
    path = tmp_path / "kpro_char_tokenizer.json"
    for text, message in (('{"type": "ch', "is not valid JSON"), ("[1, 2]", "is not a kpro char tokenizer file")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"kpro_char_tokenizer.json {message}"):
            kpro.load_tokenizer(tmp_path)


def test_info_names_a_malformed_safetensors_header_entry(tmp_path, capsys):
    """An entry without a "shape" (or with a string for one) crashed `info` with a KeyError traceback."""
    write_checkpoint(tmp_path / "ck")
    file = tmp_path / "ck" / "model.safetensors"
    data = file.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    name = next(n for n in header if n != "__metadata__")
    for broken in ({k: v for k, v in header[name].items() if k != "shape"}, {**header[name], "shape": "4"},
                   {**header[name], "dtype": None}, [1, 2]):
        text = json.dumps({**header, name: broken}).encode()
        file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
        assert main(["info", str(tmp_path / "ck")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {file}: the header entry of {name} is malformed (needs a \"dtype\" string "
                              "and a \"shape\" list of sizes, got ") and err.count("\n") == 1, err


def test_info_refuses_a_directory_holding_both_a_single_file_and_shards_as_load_pretrained_does(tmp_path, capsys):
    """info described the index's shards and exited 0 where load_pretrained refuses the directory as ambiguous."""
    model = write_checkpoint(tmp_path / "ck")
    kpro.save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    for file in (tmp_path / "sharded").iterdir():
        if file.name.startswith("model-") or file.name.endswith("index.json"):
            (tmp_path / "ck" / file.name).write_bytes(file.read_bytes())
    with pytest.raises(kpro.CheckpointError, match="ambiguous") as loading:
        kpro.load_pretrained(tmp_path / "ck")
    assert main(["info", str(tmp_path / "ck")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {loading.value}\n"


def test_info_refuses_a_bad_weight_map_with_load_pretrained_s_message(tmp_path, capsys):
    """A weight_map mapping tensors to numbers ended `info` in a TypeError traceback, or a raw Python message
    ("'<' not supported between instances of 'int' and 'str'") where load_pretrained names the fault."""
    model = write_checkpoint(tmp_path / "ck")
    kpro.save_pretrained(model, tmp_path / "ck", max_shard_size="20KB")
    index = tmp_path / "ck" / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    for weight_map in ({**good["weight_map"], "model.norm.weight": 3}, list(good["weight_map"].values()),
                       {name: 1 for name in good["weight_map"]}):
        index.write_text(json.dumps({**good, "weight_map": weight_map}))
        with pytest.raises(kpro.CheckpointError) as loading:
            kpro.load_pretrained(tmp_path / "ck")
        assert main(["info", str(tmp_path / "ck")]) == 1
        assert capsys.readouterr().err == f"error: {loading.value}\n"
        assert "must map each tensor name to a shard file name" in str(loading.value)


def test_info_refuses_a_truncated_weight_file_and_names_layers_the_tensors_lack(tmp_path, capsys):
    """A safetensors file cut short after its header, or a config.json whose num_hidden_layers the tensors do not
    match, was described as a healthy checkpoint."""
    write_checkpoint(tmp_path / "ck")
    file = tmp_path / "ck" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    assert main(["info", str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {file} is truncated: its header places tensor data up to byte {len(data):,}, the file "
                   f"has {len(data) - 100:,} bytes; write or download it again\n"), err
    file.write_bytes(data)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    for layers, message in ((3, "has num_hidden_layers 3, but the weights hold no tensors of layer 2"),
                            (1, "has num_hidden_layers 1, but the weights hold tensors of layer 1 beyond it")):
        (tmp_path / "ck" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
        assert main(["info", str(tmp_path / "ck")]) == 1
        out, err = capsys.readouterr()
        assert f"layers       {layers} x hidden 48" in out  # described all the same
        assert err.startswith(f"error: {tmp_path / 'ck' / 'config.json'} {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("args, message", [
    # raw OS errors before ([Errno 2], [Errno 21], [Errno 17], [Errno 20]), naming no flag
    (["bitune", "--model", "ck", "--data", "nope.jsonl", "--out", "o"], "--data nope.jsonl does not exist"),
    (["bitune", "--model", "ck", "--data", "ck", "--out", "o"], "--data ck is a directory; give a file"),
    (["bitune", "--model", "ck", "--data", "inst.jsonl", "--eval", "mc.jsonl", "--eval", "./mc.jsonl", "--out", "o"],
     "--eval ./mc.jsonl is named twice"),  # scored once, or twice when spelt another way
    (["bitune", "--model", "ck", "--data", "inst.jsonl", "--out", "afile"], "--out afile is a file; give a directory"),
    (["internalize", "--train", "ck", "--valid", "corpus.txt", "--out", "o"], "--train ck is a directory"),
    (["internalize", "--task", "2x2", "--out", "afile"], "--out afile is a file; give a directory"),
    (["internalize", "--task", "2x2", "--data-seed", "-1", "--out", "o"], "--data-seed must be >= 0, got -1"),
    (["internalize", "--task", "2x2", "--model", "ck", "--eval-only", "--steps", "5", "--no-select-best",
      "--out", "o"], "--steps, --no-select-best shape a training run; --eval-only evaluates --model as it is"),
    (["internalize", "--task", "2x2", "--model", "ck", "--eval-only", "--eval-examples", "5", "--out", "o"],
     "--eval-examples shape a training run; --eval-only evaluates"),  # ignored before
    (["internalize", "--task", "2x2", "--train", "corpus.txt", "--train-size", "5", "--out", "o"],
     "--train-size sizes a generated training set; --train corpus.txt is read as it is"),  # ignored before
    (["internalize", "--task", "4x4", "--eval-size", "16", "--out", "o"],  # ignored before, as the next three
     "--eval-size sizes generated valid and test sets; --task 4x4 has published ones"),
    (["internalize", "--task", "3x3", "--valid", "corpus.txt", "--test", "corpus.txt", "--eval-size", "16", "--out",
      "o"], "--eval-size sizes generated valid and test sets; --valid corpus.txt and --test corpus.txt are read"),
    (["internalize", "--task", "4x4", "--train", "corpus.txt", "--data-seed", "3", "--out", "o"],
     "--data-seed seeds generated data sets; --task 4x4 has published ones, and --train corpus.txt is read as it is"),
    (["internalize", "--task", "gsm8k", "--model", "ck", "--eval-only", "--data-seed", "3", "--out", "o"],
     "--data-seed seeds generated data sets; --task gsm8k has published ones, and --eval-only trains on none"),
    (["tokenize", "--tokenizer", "ck", "--data", "corpus.txt", "--out", "afile"], "--out afile is a file"),
    (["generate", "ck", "--prompt", "a", "--temperature", "1", "--seed", "-1"], "--seed must be an integer from 0"),
    (["generate", "ck", "--prompt", "a", "--temperature", "1", "--seed", str(2 ** 80)], "--seed must be an integer"),
    (["generate", "ck", "--prompt", "ab", "--prompt", ""], "--prompt 2 is empty"),  # pad_left's message before
    (["generate", "ck", "--prompt", "ab", "--seed", "3"],  # ignored before, as --top-k and --top-p are refused
     "--seed seeds sampling, but temperature 0 decodes greedily: give a --temperature above 0 to sample, or leave "
     "--seed out"),
    (["expand", "ck/config.json", "x", "--blocks", "1"], "ck/config.json is a file, not a checkpoint directory"),
    (["expand", "ck", "afile", "--blocks", "1"], "DST afile is a file; give a directory"),  # "is not empty" before
    # an output path under a file: raw errnos naming no flag before ([Errno 20], [Errno 17]), bitune's after loading
    *[(args, f"{flag} afile/sub: afile is a file, not a directory") for flag, args in (
        ("--out", ["bitune", "--model", "ck", "--data", "inst.jsonl", "--out", "afile/sub"]),
        ("--out", ["tokenize", "--tokenizer", "ck", "--data", "corpus.txt", "--out", "afile/sub"]),
        ("--out", ["internalize", "--task", "2x2", "--out", "afile/sub"]),
        ("--out", ["train-expanded", "ck", "--data", "corpus.txt", "--train-blocks", "1", "--out", "afile/sub"]),
        ("DST", ["expand", "ck", "afile/sub", "--blocks", "1"]),
        ("OUT", ["convert-gguf", "m.gguf", "afile/sub"]),  # after reading the GGUF file before
        ("--out", ["demo", "basics", "--out", "afile/sub"]))],
    (["convert-gguf", "m.gguf", "afile"], "OUT afile is a file; give a directory"),  # after reading it before
    (["train-expanded", "ck", "--data", "corpus.txt", "--out", "ck/run"], "--out ck/run is inside the checkpoint ck"),
    (["train-expanded", "ck", "--data", "corpus.txt", "--train-blocks", "1", "--out", "afile"],
     "--out afile is a file; give a directory"),  # after the model loaded and the corpus was read, as out_dir
    (["demo", "basics", "basics"], "demo act basics is named twice"),
    # kpro.generate's and parse_size's messages, which named the Python parameters (max_new_tokens, max_shard_size)
    (["generate", "ck", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    # kpro.generate's "prompt (5) + max_new_tokens (61) exceeds the model's max_position_embeddings=64" (bos + abcd)
    (["generate", "ck", "--prompt", "a", "--prompt", "abcd", "--max-new-tokens", "61"],
     "--prompt 2 (5 tokens) + --max-new-tokens 61 exceed the model's max_position_embeddings (64): pass "
     "--max-new-tokens 59 or less, or shorten the prompt"),
    (["generate", "ck", "--prompt", "ab" * 40], "--prompt 1 (81 tokens) + --max-new-tokens 32 exceed the model's "
     "max_position_embeddings (64): shorten the prompt to at most 32 tokens"),
    (["generate", "ck", "--prompt", "a", "--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["generate", "ck", "--prompt", "a", "--temperature", "1", "--top-k", "0"], "--top-k must be a positive integer"),
    (["generate", "ck", "--prompt", "a", "--temperature", "1", "--top-p", "0"], "--top-p must be a number in (0, 1]"),
    (["generate", "ck", "--prompt", "a", "--top-k", "2"], "--top-k and --top-p restrict sampling, but --temperature 0 "
                                                         "decodes greedily: give a --temperature above 0 to sample"),
    (["expand", "ck", "x", "--blocks", "1", "--max-shard-size", "0"], "--max-shard-size must be positive, got '0'"),
    (["expand", "ck", "x", "--blocks", "1", "--max-shard-size", "5XB"],
     "cannot read --max-shard-size '5XB'; use a byte count or a string like '5GB'"),
    (["convert-gguf", "m.gguf", "x", "--max-shard-size", "0.1"],  # after reading the file before
     "--max-shard-size must be positive, got '0.1'"),
    # device types torch parses but kpro's commands do not run on: tracebacks from deep inside torch before
    *[(["generate", "ck", "--prompt", "a", "--device", device], f"--device {device}: kpro's commands run on cpu, "
       "cuda or cuda:N") for device in ("meta", "mps", "xpu", "meta:0")],
    (["bitune", "--model", "ck", "--data", "inst.jsonl", "--out", "o", "--device", "mps"], "--device mps: kpro's"),
])
def test_command_errors_name_their_flag(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "corpus.txt").write_text("ab cd\n\nef gh\n")
    (tmp_path / "inst.jsonl").write_text('{"instruction": "ab", "response": "cd"}\n')
    (tmp_path / "mc.jsonl").write_text('{"question": "ab", "choices": ["c", "d"], "answer": 0}\n')
    (tmp_path / "afile").write_text("")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # not a whole one: refused if read
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("value, message", [
    ("bogus", "KPRO_BACKEND: unknown backend 'bogus'; choose from auto, torch, triton, cuda"),
    ("rms_norm=cuda,rms_norm=torch", "KPRO_BACKEND='rms_norm=cuda,rms_norm=torch' names a backend for rms_norm twice"),
    # backends no device has for these ops: refused at the first forward, after the model had loaded
    ("attention=cuda", "KPRO_BACKEND='attention=cuda' asks for a backend kpro has no kernel of on any device: "
                       "attention=cuda, but attention has torch/triton; name those ops' backends (attention=triton)"),
    ("cuda,attention=triton", "bitune_attention=cuda, but bitune_attention has torch/triton; linear_cross_entropy=cuda, "
                              "but linear_cross_entropy has torch/triton;"),
])
def test_a_bad_kpro_backend_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, value, message):
    """A bad KPRO_BACKEND ended every command in a BackendError traceback, train-expanded's only after loading the
    model and tokenizing the corpus (leaving an empty metrics.jsonl)."""
    from kpro.expansion import posttrain

    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "corpus.txt").write_text("ab cd\n\nef gh\n")
    monkeypatch.setenv("KPRO_BACKEND", value)
    monkeypatch.setattr(posttrain, "load_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    for args in (["generate", "ck", "--prompt", "a", "--device", "cpu"],
                 ["train-expanded", "ck", "--data", "corpus.txt", "--out", "run", "--steps", "2"]):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_backend_that_cannot_run_a_call_is_one_line(tmp_path, capsys, monkeypatch):
    """KPRO_BACKEND=cuda with --device cpu: the kernels' refusal, raised in the model's forward, was a traceback.
    (A bare cuda is refused up front now: attention has no cuda kernel; RMSNorm and SwiGLU have one.)"""
    write_checkpoint(tmp_path / "ck")
    monkeypatch.setenv("KPRO_BACKEND", "rms_norm=cuda,swiglu=cuda")
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "a", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "backend 'cuda' cannot run this call" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "--lr must be a positive finite number, got 0"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0 (0: no warmup), got -1"),
    (["--steps", "10", "--warmup-steps", "10"], "--warmup-steps 10 must be fewer than --steps 10"),
    # pack_documents refused it after the loading and tokenizing, as "seq_len must be an integer >= 2"
    (["--seq-len", "1"], "--seq-len must be an integer >= 2 (a row trains each token on the next), got 1"),
    # fit refused it after the loading and tokenizing, as "a global batch of 6 rows cannot be split", naming no flag
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 must be a multiple of --grad-accum 4"),
    (["--batch-size", "6", "--grad-accum", "2", "WORLD_SIZE=4"],
     "--batch-size 6 must be a multiple of --grad-accum 2 x 4 processes (torchrun's WORLD_SIZE) = 8"),
    # refused after the model loaded, as "seq_len 100 exceeds ..." and "block index 5 is out of range", no flag named
    (["--seq-len", "100"], "--seq-len 100 exceeds the model's max_position_embeddings (64): pass --seq-len 64 or less"),
    (["--train-blocks", "0,5"], "--train-blocks 0,5: block index 5 is out of range: the model has 2 blocks (0 ... 1)"),
    # -1 was refused by Batches after the corpus was tokenized, naming no flag; 2**61 - 1 ran with --seed 0's order
    *[(["--seed", seed], f"--seed must be an integer from 0 to 2**61 - 2 (a larger one would repeat a smaller one's "
       f"data order), got {seed}") for seed in ("-1", str(2 ** 61 - 1), str(10 ** 23))],
    # "invalid literal for int() with base 10: 'abc'", naming nothing
    (["WORLD_SIZE=abc"], "the environment variable WORLD_SIZE (torchrun's number of processes) must be a positive "
                         "integer, got 'abc'"),
    (["WORLD_SIZE=0"], "WORLD_SIZE (torchrun's number of processes) must be a positive integer, got '0'"),
])
def test_train_expanded_refuses_bad_optimizer_flags_before_loading_anything(tmp_path, capsys, monkeypatch, args,
                                                                           message):
    """Schedule and adamw refused them, naming their Python parameters ("total_steps > warmup_steps"), after
    the model loaded and the whole corpus was tokenized (20 s for 29 MB, silent)."""
    from kpro.expansion import posttrain
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "corpus.txt").write_text("ab cd\n\nef gh\n")
    monkeypatch.setattr(posttrain, "read_corpus", lambda paths: pytest.fail("the corpus was read"))
    monkeypatch.setattr(posttrain, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    for setting in [arg for arg in args if "=" in arg]:  # the environment torchrun sets
        monkeypatch.setenv(*setting.split("="))
    args = [arg for arg in args if "=" not in arg]
    assert main(["train-expanded", "ck", "--data", "corpus.txt", "--train-blocks", "1", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args, environment, message", [
    # "invalid literal for int() with base 10: 'abc'", naming nothing (train-expanded's is above)
    *[(args, {"WORLD_SIZE": "abc"}, "the environment variable WORLD_SIZE (torchrun's number of processes) must be a "
       "positive integer, got 'abc'") for args in (["bitune", "--model", "ck", "--data", "inst.jsonl", "--out", "o"],
                                                   ["internalize", "--task", "2x2", "--out", "o"])],
    # every process ran the whole command into the same output: one finished, the others were refused (exit 1)
    (["expand", "ck", "o", "--blocks", "1"], {"WORLD_SIZE": "2"},
     "expand runs in one process (it uses no process group): run it without torchrun"),
    (["tokenize", "--tokenizer", "ck", "--data", "corpus.txt", "--out", "o"], {"WORLD_SIZE": "2"},
     "tokenize runs in one process (it uses no process group; --workers sets its tokenizing processes): run it "
     "without torchrun"),
    # refused by ValidationAccuracy, in Python's terms, on every process after --out/data and metrics.jsonl were written
    (["internalize", "--task", "2x2", "--out", "o"], {"WORLD_SIZE": "2"},
     "--select-best (the default) evaluates in one process, and torchrun started 2 (WORLD_SIZE): pass "
     "--no-select-best (the final model is kept), or run without torchrun"),
    # fit refused them after the model loaded (or the data was written), naming no flag, on every process
    (["bitune", "--model", "ck", "--data", "inst.jsonl", "--out", "o", "--batch-size", "3"], {"WORLD_SIZE": "2"},
     "--batch-size 3 must be a multiple of the 2 processes (torchrun's WORLD_SIZE): each optimizer step's rows are "
     "split evenly between them; change --batch-size"),
    (["internalize", "--task", "2x2", "--out", "o", "--no-select-best", "--batch-size", "7"], {"WORLD_SIZE": "2"},
     "--batch-size 7 must be a multiple of the 2 processes (torchrun's WORLD_SIZE)"),
], ids=lambda value: value[0] if isinstance(value, list) else " ".join(f"{k}={v}" for k, v in value.items())
   if isinstance(value, dict) else "")
def test_torchrun_settings_are_refused_before_any_work(tmp_path, capsys, monkeypatch, args, environment, message):
    """What torchrun's environment makes wrong, named in one line before the model loads or data is written."""
    from kpro import checkpoint
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "corpus.txt").write_text("ab cd\n\nef gh\n")
    (tmp_path / "inst.jsonl").write_text('{"instruction": "ab", "response": "cd"}\n' * 4)
    monkeypatch.setattr(checkpoint, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not [path.name for path in (tmp_path / "o").rglob("*")]  # no data, no metrics.jsonl


@pytest.mark.parametrize("args", [
    ["bitune", "--model", "ck", "--data", "inst.jsonl", "--out", ""],
    ["internalize", "--task", "2x2", "--out", ""],
    ["train-expanded", "ck", "--data", "corpus.txt", "--out", ""],  # fell back to <DIR>-post
    ["tokenize", "--tokenizer", "ck", "--data", "corpus.txt", "--out", ""],
    ["expand", "ck", "", "--blocks", "1"],
    ["convert-gguf", "m.gguf", ""],
], ids=lambda args: args[0])
def test_an_empty_output_directory_is_refused(tmp_path, capsys, monkeypatch, args):
    """An unset `--out "$OUT"` was taken as the current directory (demo and reproduce refused it already)."""
    monkeypatch.chdir(tmp_path)  # where the command wrote before
    with pytest.raises(SystemExit):
        main(args)
    assert "expected a directory, got an empty path (pass . for this directory)" in capsys.readouterr().err


@pytest.mark.parametrize("args, argument", [
    (["info", ""], "dir"),
    (["generate", "", "--prompt", "a"], "dir"),
    (["expand", "", "x", "--blocks", "1"], "src"),
    (["train-expanded", "", "--data", "corpus.txt"], "dir"),
    (["train-expanded", "ck", "--data", ""], "--data"),
    (["bitune", "--model", "", "--data", "inst.jsonl"], "--model"),
    (["tokenize", "--tokenizer", "", "--data", "corpus.txt", "--out", "o"], "--tokenizer"),
    (["tokenize", "--tokenizer", "ck", "--data", "corpus.txt", "", "--out", "o"], "--data"),  # read the whole cwd
    (["internalize", "--task", "2x2", "--model", ""], "--model"),
    (["convert-gguf", "", "o"], "file"),
    # "--data . is a directory; give a file" before: the empty path read as the current directory
    (["bitune", "--model", "ck", "--data", ""], "--data"),
    (["bitune", "--model", "ck", "--data", "inst.jsonl", "--eval", ""], "--eval"),
    *[(["internalize", "--task", "4x4", flag, ""], flag) for flag in ("--train", "--valid", "--test")],
], ids=lambda value: value[0] if isinstance(value, list) else value)
def test_an_empty_input_path_is_refused(tmp_path, capsys, monkeypatch, args, argument):
    """An unset "$CKPT" was taken as the current directory: inside a checkpoint, `info ""` and `generate ""` ran on
    it; elsewhere info said "no config.json at config.json"."""
    write_checkpoint(tmp_path / "ck")
    monkeypatch.chdir(tmp_path / "ck")
    with pytest.raises(SystemExit):
        main(args)
    assert f"argument {argument}: expected a path, got an empty one" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["expand", "ck", "OUT", "--blocks", "1"],
    ["tokenize", "--tokenizer", "ck", "--data", "corpus.txt", "--out", "OUT", "--workers", "1"],
    ["train-expanded", "ck", "--data", "corpus.txt", "--train-blocks", "1", "--out", "OUT"],
    ["bitune", "--model", "ck", "--data", "inst.jsonl", "--out", "OUT"],
    ["internalize", "--task", "2x2", "--out", "OUT"],
    ["convert-gguf", "m.gguf", "OUT"],
    ["demo", "basics", "--out", "OUT"],
    ["reproduce", "bitune-readings", "--out", "OUT"],
], ids=lambda args: args[0])
@pytest.mark.parametrize("out", ["link", "link/sub"])
def test_an_output_directory_through_a_dangling_symbolic_link_is_refused_up_front(tmp_path, capsys, monkeypatch,
                                                                                 args, out):
    """--out a symbolic link whose target is missing (not created yet, deleted, an unmounted disk): tokenize,
    train-expanded, bitune (after loading the model), internalize and demo failed with "[Errno 17] File exists:
    'out'", while expand created the target. Every command now refuses it before any work, naming both."""
    from kpro.expansion import posttrain

    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "corpus.txt").write_text("ab cd\n\nef gh\n")
    (tmp_path / "inst.jsonl").write_text('{"instruction": "ab", "response": "cd"}\n')
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "link").symlink_to("missing-target")
    monkeypatch.setattr(posttrain, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    flag = {"expand": "DST", "convert-gguf": "OUT"}.get(args[0], "--out")
    assert main([out if a == "OUT" else a for a in args]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {flag} {out}: link is a symbolic link to missing-target, which does not exist; create "
                   "it, or pass another directory\n"), err
    assert not (tmp_path / "missing-target").exists()


@pytest.mark.parametrize("args, dest", [
    (["info", "~/x"], "dir"), (["generate", "~/x", "--prompt", "a"], "dir"),
    (["expand", "~/x", "y", "--blocks", "1"], "src"), (["expand", "x", "~/x", "--blocks", "1"], "dst"),
    (["train-expanded", "~/x", "--data", "c"], "dir"), (["train-expanded", "x", "--data", "~/x"], "data"),
    (["train-expanded", "x", "--data", "c", "--out=~/x"], "out"),
    (["bitune", "--model", "~/x", "--data", "d"], "model"), (["bitune", "--model", "m", "--data=~/x"], "data"),
    (["bitune", "--model", "m", "--data", "d", "--eval=~/x"], "eval"),
    (["bitune", "--model", "m", "--data", "d", "--out=~/x"], "out"),
    (["tokenize", "--tokenizer=~/x", "--data", "c", "--out", "o"], "tokenizer"),
    (["tokenize", "--tokenizer", "t", "--data", "~/x", "--out", "o"], "data"),
    (["tokenize", "--tokenizer", "t", "--data", "c", "--out=~/x"], "out"),
    (["internalize", "--out=~/x"], "out"), (["internalize", "--out", "o", "--model=~/x"], "model"),
    *[(["internalize", "--out", "o", f"--{flag}=~/x"], flag) for flag in ("train", "valid", "test")],
    (["convert-gguf", "~/x", "o"], "file"), (["convert-gguf", "f", "~/x"], "out"),
    (["demo", "--out=~/x"], "out"), (["reproduce", "bitune", "--out=~/x"], "out"),
], ids=lambda value: " ".join(value)[:40] if isinstance(value, list) else value)
def test_a_path_starting_with_a_tilde_is_in_the_home_directory(args, dest, monkeypatch, tmp_path):
    """bash leaves `--out=~/x` (and a quoted "~/x") as it is: tokenize wrote its shards to ./~/tokens and said it
    wrote them to ~/tokens."""
    monkeypatch.setenv("HOME", str(tmp_path))
    value = getattr(cli.build_parser(args[0]).parse_args(args), dest)
    assert str(value[-1] if isinstance(value, list) else value) == str(tmp_path / "x")


def test_train_expanded_runs_beside_a_checkpoint_given_as_dot(tmp_path, capsys, monkeypatch):
    """`train-expanded .` wrote its run to a directory named `-post` inside the checkpoint."""
    write_checkpoint(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "with space"), "--blocks", "1"]) == 0
    assert f"next: python -m kpro train-expanded '{tmp_path / 'with space'}' --data" in capsys.readouterr().out
    (tmp_path / "corpus.txt").write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(8)))
    monkeypatch.chdir(tmp_path / "with space")
    assert main(["train-expanded", ".", "--data", "../corpus.txt", "--steps", "1", "--seq-len", "8",
                 "--batch-size", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "with space-post" / "final" / "config.json").is_file()
    assert not any(p.name.endswith("-post") for p in (tmp_path / "with space").iterdir())


def test_train_expanded_s_default_out_is_beside_the_directory_a_link_resolves_to(tmp_path, capsys, monkeypatch):
    """DIR a symbolic link: the run went beside the link's target, named after it, while the help and
    docs/expansion.md said `<DIR name>-post, beside DIR`. They now say so."""
    write_checkpoint(tmp_path / "src")
    (tmp_path / "models").mkdir()
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "models" / "expanded"), "--blocks", "1"]) == 0
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "my-model").symlink_to("../models/expanded")
    (tmp_path / "corpus.txt").write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(8)))
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train-expanded", "my-model", "--data", "../corpus.txt", "--steps", "1", "--seq-len", "8",
                 "--batch-size", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "models" / "expanded-post" / "final" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["my-model"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train-expanded", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "run directory (default: <name>-post beside the directory DIR names, a symbolic link's target" in shown
    docs = " ".join((ROOT / "docs" / "expansion.md").read_text().split())
    assert "`--out` defaults to `<name>-post` beside the directory DIR names (a symbolic link DIR: beside its " \
           "target, named after it" in docs


def test_a_diverging_run_stops_with_one_line_naming_the_step_and_checkpoint(tmp_path, capsys, monkeypatch):
    """A run going NaN stopped with a traceback ("the last checkpoint is None"). (It went NaN with float16 weights,
    now refused: AdamW's eps is 0 there; here its weights grow to 1e30 after the first step, and the second step's
    gradient norm overflows. Weights that turn NaN are named as such: test_train_fit's non-finite-weights test.)"""
    from kpro.expansion import posttrain
    adamw = posttrain.adamw

    def diverging_adamw(model, *args, **kwargs):
        optimizer = adamw(model, *args, **kwargs)
        # weights finite but so large that the next gradient norm overflows: the step before is the last good checkpoint
        optimizer.register_step_post_hook(lambda *_: [p.data.fill_(1e30) for p in model.parameters()])
        return optimizer
    monkeypatch.setattr(posttrain, "adamw", diverging_adamw)
    write_checkpoint(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    code = main(["train-expanded", str(tmp_path / "big"), "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--seq-len", "16", "--batch-size", "4", "--steps", "4", "--save-every", "1", "--lr", "1e-3",
                 "--device", "cpu"])
    err = capsys.readouterr().err  # the progress and status lines, then the error in one line
    error = err[err.index("error: "):]
    assert code == 1 and error.startswith("error: the gradient norm is nan") and error.count("\n") == 1, err
    assert "Traceback" not in err and "step     1/4" in err, err
    assert " at step 2: stopped before its optimizer step; the last good checkpoint is " \
           f"{tmp_path / 'run'}/step-00000001" in err, err


def test_train_expanded_refuses_float16_weights(tmp_path, capsys):
    """`--dtype float16` always stopped at a NaN loss, suggesting a lower lr or clipping: AdamW's eps (1e-8) is 0
    in float16, and the new blocks' gradients at step 1 are 0, so their first step is 0 / 0."""
    from kpro.expansion.posttrain import train_expanded

    write_checkpoint(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top"]) == 0
    (tmp_path / "corpus.txt").write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(8)))
    with pytest.raises(SystemExit):
        main(["train-expanded", str(tmp_path / "big"), "--data", str(tmp_path / "corpus.txt"), "--dtype", "float16"])
    assert "argument --dtype: invalid choice: 'float16'" in capsys.readouterr().err
    for dtype in (torch.float16, "fp16"):  # refused before the corpus is tokenized, not by AdamW afterwards
        with pytest.raises(ValueError, match=r"^dtype float16 is a dtype AdamW cannot train: its second moment"):
            train_expanded(tmp_path / "big", tmp_path / "corpus.txt", tmp_path / "run", steps=1, seq_len=8,
                           batch_size=2, dtype=dtype, device="cpu")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ more --steps

def test_train_expanded_extends_a_finished_run_with_more_steps(tmp_path, capsys):
    """The default warmup (5% of the steps) was recomputed for the new total and the resume refused."""
    write_checkpoint(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    args = ["train-expanded", str(tmp_path / "big"), "--data", str(corpus), "--out", str(tmp_path / "run"),
            "--seq-len", "8", "--batch-size", "2", "--device", "cpu"]
    assert main(args + ["--steps", "20"]) == 0  # warmup 1
    assert main(args + ["--steps", "40"]) == 0  # 5% would be 2: the run keeps its 1 and goes on
    captured = capsys.readouterr()
    assert "resumed from" in captured.err and "continuing the run with total_steps=40" in captured.err
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 41))
    assert main(args + ["--steps", "40", "--warmup-steps", "3"]) == 1  # an explicit other warmup is refused
    assert "--warmup-steps: 1 in the run, 3 now" in capsys.readouterr().err


def test_bitune_extends_a_finished_run_with_more_steps_and_runs_one_step(tmp_path, capsys):
    from kpro import bitune

    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 12, (3,), generator=gen).tolist(), torch.randint(3, 12, (2,), generator=gen).tolist())
             for _ in range(8)]
    for steps in (5, 11):  # warmup 10%, rounded up: 1, then 2 for the new total; the run keeps its 1
        torch.manual_seed(0)  # the same base model: a resume onto another is refused
        bitune.tune(kpro.Llama(tiny_config(vocab_size=13, num_hidden_layers=1)), pairs, "bitune", tmp_path / "run",
                    steps=steps, batch_size=2, rank=2)
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "run" / "metrics.jsonl")] == list(range(1, 12))
    assert "continuing the run with total_steps=11" in capsys.readouterr().err
    # One step of the linear schedule: no warmup (10% rounds up to the whole run, which had no decay left).
    bitune.tune(kpro.Llama(tiny_config(vocab_size=13, num_hidden_layers=1)), pairs, "bitune", tmp_path / "one",
                steps=1, batch_size=2, rank=2)
    assert [m["step"] for m in read_metrics(tmp_path / "one" / "run" / "metrics.jsonl")] == [1]


def test_a_seed_range_in_help_is_the_range_its_command_accepts():
    """internalize's --help said 0 to 2**63 - 1 after its check became 0 to 2**61 - 2 (a larger seed repeats a
    smaller one's data order)."""
    from kpro.cli import build_parser

    def seed_helps(parser, path=()):
        for action in parser._actions:
            if "--seed" in action.option_strings:
                yield " ".join(path), action.help
            if isinstance(getattr(action, "choices", None), dict):
                for name, sub in action.choices.items():
                    yield from seed_helps(sub, (*path, name))
    helps = dict(seed_helps(build_parser()))
    assert "2**61 - 2" in helps["internalize"]
    stated = {command: help for command, help in helps.items() if "2**" in help}
    assert stated and all("0 to 2**61 - 2" in help for help in stated.values()), stated


@pytest.mark.parametrize("text", ["0", "-2", "x"])
def test_positive_int_refuses_zero_negative_and_non_numbers(text):
    import argparse
    from kpro.cli_args import positive_int
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer"):
        positive_int(text)
    assert positive_int("3") == 3


# Mutation round 11: RR1 (_run_record.py:44 only --out itself, not the folders above it, counted as made)
def test_a_command_failing_before_it_writes_removes_the_folders_it_made_above_out(tmp_path):
    from kpro._run_record import claimed_run_directory

    out = tmp_path / "runs" / "june" / "out"
    with pytest.raises(RuntimeError):
        with claimed_run_directory(out, "bitune"):
            assert (out / "kpro_run.json").is_file()
            raise RuntimeError("refused before writing")
    assert list(tmp_path.iterdir()) == []  # "(and --out and the folders above it, where it made them)"


# Mutation round 11: SIG1 (_signals.py:34 every notice taken, a SIG_IGN one (nohup) included)
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX")
def test_a_notice_ignored_on_purpose_stays_ignored_in_the_block():
    from kpro._signals import sigterm_as_ctrl_c

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    try:
        with sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert callable(signal.getsignal(signal.SIGTERM))
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


# Mutation round 11: SIG2 (_signals.py:58 `_stopping = outer` -> `None`: leaving a nested block forgets the outer
# one)
def test_a_notice_after_a_nested_block_ended_is_named_and_a_second_one_is_the_same_notice():
    from kpro import _signals

    def wait_for_signal():
        for _ in range(100):
            time.sleep(0.01)

    with pytest.raises(KeyboardInterrupt):
        with _signals.sigterm_as_ctrl_c():  # the command's block
            with _signals.sigterm_as_ctrl_c():  # a pool's or tokenize's, ended normally
                pass
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                wait_for_signal()
            except KeyboardInterrupt:
                assert _signals.notice_taken() == signal.SIGTERM  # else the stop is called "Ctrl-C"
                os.kill(os.getpid(), signal.SIGTERM)  # timeout's second notice, during the cleanup
                wait_for_signal()  # no second KeyboardInterrupt here
                raise
    assert _signals.notice_taken() == 0


# Mutation round 11: CLI1 (cli.py:98 `length + max_new_tokens <= limit` -> `<`)
def test_generate_takes_a_prompt_and_new_tokens_that_fill_the_positions_exactly():
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(max_position_embeddings=16))
    kpro.generate(model, torch.full((1, 6), 5), 10)  # kpro.generate takes 6 + 10 == 16 positions
    cli.check_positions([[5] * 3, [5] * 6], 10, 16)  # so the command's check takes them too
    with pytest.raises(ValueError, match=r"--prompt 2 \(6 tokens\) \+ --max-new-tokens 11 exceed .*--max-new-tokens 10 "
                                         "or less"):
        cli.check_positions([[5] * 3, [5] * 6], 11, 16)


# Mutation round 11: CA2 (cli_args.py:155 `not text.strip()` -> `not text`) (low priority: a blank, not empty, --out
# would create a directory named by spaces in the current one)
def test_a_blank_output_path_is_refused_as_an_empty_one():
    from kpro.cli_args import directory_path

    with pytest.raises(argparse.ArgumentTypeError, match="got an empty path"):
        directory_path("  ")
