"""The demo's acts run end to end (shortened), and each act's claim line is computed from its numbers.

The full-length run is `python -m kpro demo`. Each act ends with one line, `claim (act): ... -- SHOWN by this
run: ...` or `NOT SHOWN`; its verdict function is tested here on made-up numbers both ways, and each act,
run at tiny settings, must print the verdict that its returned numbers give. The tiny runs land below the
thresholds, so each act is also fed made-up numbers that pass them (its training or its jobs' results stubbed)
and must print SHOWN, with those figures.
"""
import contextlib
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import _parallel_jobs
import kpro
from kpro.demo import basics as demo
from kpro.demo import bitune, claims, expansion, internalization, llama_pro_smollm2, seeds, smollm2
from kpro.demo.parallel import run_jobs
from kpro.demo.progress import RunsProgress
from kpro.train import Callback
from kpro.train.progress import last_logged_step
from conftest import process_running, tiny_config

CLAIM_LINE = re.compile(r"^claim \((\w+)\): (.+) -- (SHOWN|NOT SHOWN) by this run: (.+)$", re.M)


@contextlib.contextmanager
def one_thread():
    """As the acts score (one thread): the same reductions, so the same greedy answers bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def claim_of(out: str, act: str) -> tuple[bool, str]:
    """(shown, figures) of the one claim line of `act` in the printed output."""
    lines = [m for m in CLAIM_LINE.finditer(out) if m.group(1) == act]
    assert len(lines) == 1, out
    return lines[0].group(3) == "SHOWN", lines[0].group(4)


def test_claim_line_and_standard_errors():
    assert claims.claim_line("x", "it works", True, "1 vs 0") == "claim (x): it works -- SHOWN by this run: 1 vs 0"
    assert "NOT SHOWN" in claims.claim_line("x", "it works", False, "")
    assert claims.standard_error(0.5, 100) == pytest.approx(0.05)
    assert claims.difference_standard_error(0.5, 100, 0.5, 100) == pytest.approx(0.05 * 2 ** 0.5)
    assert claims.in_standard_errors(0.1, 0.05) == "+2.0 standard errors"
    assert claims.in_standard_errors(0.0, 0.0) == "no spread to measure it against"


def test_the_demo_duration_and_the_seed_help_say_what_runs():
    """kpro.demo's docstring said the demo takes 9 to 23 minutes, where README and benchmarks/RESULTS.md measured
    7.1 to 22.5; `reproduce --help` said a reproduction over seeds runs S, S+1, ..., but expansion-curves runs
    seeds S and S+4 (its 0 and 4, shifted)."""
    from kpro.cli import COMMANDS, build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    measured = re.search(r"(\d+\.\d to \d+\.\d) minutes on 2 idle CPU cores", readme).group(1)
    assert f"{measured} minutes" in kpro.demo.__doc__.splitlines()[0]
    assert f"({measured} minutes on 2 CPU cores, by machine)" in COMMANDS["demo"][1]  # `python -m kpro --help`
    reproduce = build_parser("reproduce")._subparsers._group_actions[0].choices["reproduce"]
    (seed,) = [action for action in reproduce._actions if "--seed" in action.option_strings]
    assert "expansion-curves S and S+4" in seed.help


def test_demo_and_reproduce_refuse_a_file_as_out_and_a_bad_seed_before_any_work(tmp_path, capsys):
    from kpro.cli import main

    (tmp_path / "afile").write_text("mine")
    for command in (["demo", "basics"], ["reproduce", "bitune-seeds"]):  # a traceback minutes in, before
        assert main([*command, "--out", str(tmp_path / "afile" / "sub")]) == 1
        err = capsys.readouterr().err
        assert err == f"error: --out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a directory\n"
        # 2**64 failed with "Overflow when unpacking long long"; 2**61 - 1 shuffled as seed 0 (Batches' hash)
        for seed in ("-1", str(2 ** 64), str(2 ** 61 - 1)):
            assert main([*command, "--out", str(tmp_path / "out"), "--seed", seed]) == 1
            assert capsys.readouterr().err == ("error: --seed must be an integer from 0 to 2**61 - 2 (a larger one "
                                               f"would repeat a smaller one's data order), got {seed}\n")
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_options_without_a_name_and_fails_when_the_reproduction_did_not_run(tmp_path, capsys,
                                                                                              monkeypatch):
    """`reproduce --seed 7` (or --out) without a NAME listed the reproductions and exited 0, the option ignored; a
    named reproduction whose model or data is not installed printed `skipped: ...` and exited 0, as if it had run."""
    import dataclasses

    import kpro.demo as demo_package
    from kpro.cli import main

    for args, given in ((["--seed", "7"], "--seed"), (["--seed", "0"], "--seed"), (["--out", str(tmp_path / "o")],
                        "--out"), (["--out", str(tmp_path / "o"), "--seed", "1"], "--out, --seed")):
        assert main(["reproduce", *args]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: {given} ") and "give a reproduction's NAME" in err \
            and err.count("\n") == 1, err

    def not_installed(out_dir, seed=0):
        print("skipped: the model is not installed: pip install it")
        return {"skipped": "the model is not installed: pip install it"}
    monkeypatch.setitem(demo_package.REPRODUCTIONS, "needs-a-model",
                        dataclasses.replace(demo_package.REPRODUCTIONS["expansion-seeds"], run=not_installed))
    assert main(["reproduce", "needs-a-model", "--out", str(tmp_path / "r")]) == 1
    out, err = capsys.readouterr()
    assert out == "skipped: the model is not installed: pip install it\n"
    assert err == "error: reproduce needs-a-model did not run: the model is not installed: pip install it\n"


def test_a_rerun_with_other_settings_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A rerun into the same --out with another --seed failed minutes in with an error that named neither the
    directory nor the fix; through the API, an act rerun with other settings resumed some runs from checkpoints
    of the old ones (an internalized model trained from an explicit-CoT model no longer beside it). Each act
    records its settings; bad arguments, KPRO_DEMO_WORKERS and an act's directory that is a file are refused
    before any work as well."""
    from kpro.cli import main
    from kpro.demo import act_settings

    tiny = dict(explicit_steps=6, steps_per_token=2, after_steps=4, decay_steps=0, warmup_steps=1, valid_size=4,
                test_size=4, eval_every=4, workers=1)
    internalization.act_internalization(tmp_path / "i", **tiny)
    recorded = json.loads((tmp_path / "i" / act_settings.SETTINGS_FILE).read_text())
    assert recorded["act"] == "act_internalization" and recorded["explicit_steps"] == 6 and "workers" not in recorded
    weights = (tmp_path / "i" / "internalized" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds a run with other settings \(explicit_steps 6 there, 8 now\): its "
                                         r"checkpoints would mix with this run's; pass another output directory"):
        internalization.act_internalization(tmp_path / "i", **{**tiny, "explicit_steps": 8})
    internalization.act_internalization(tmp_path / "i", **{**tiny, "workers": 2})  # workers change no number
    assert (tmp_path / "i" / "internalized" / "model" / "model.safetensors").read_bytes() == weights
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / act_settings.SETTINGS_FILE).write_text("[1]")  # a TypeError before
    with pytest.raises(ValueError, match="holds a JSON list, not the settings kpro writes: delete"):
        internalization.act_internalization(tmp_path / "j", **tiny)

    class Stopped(Exception):
        pass

    def stop_at_once(*args, **kwargs):
        raise Stopped

    def stop(model, batches, run_dir, **kwargs):  # after its first metrics line
        (Path(run_dir) / "metrics.jsonl").write_text('{"step": 1}\n')
        raise Stopped
    monkeypatch.setattr(demo, "fit", stop_at_once)
    with pytest.raises(Stopped):  # stopped before anything was written beside its settings
        main(["demo", "basics", "--out", str(tmp_path / "d"), "--seed", "2"])
    # no run to mix with: the settings are not kept to refuse another seed ("its checkpoints would mix", before)
    assert not (tmp_path / "d" / "basics-run" / act_settings.SETTINGS_FILE).exists()
    monkeypatch.setattr(demo, "fit", stop)
    with pytest.raises(Stopped):  # `demo basics --seed 1`, stopped in its training
        main(["demo", "basics", "--out", str(tmp_path / "d"), "--seed", "1"])
    monkeypatch.undo()
    capsys.readouterr()
    for command in (["demo", "basics"], ["reproduce", "expansion-seeds"]):  # an unset --out "$DIR": the current one
        with pytest.raises(SystemExit):
            main([*command, "--out", ""])
        assert "argument --out: expected a directory, got an empty path" in capsys.readouterr().err
    assert main(["demo", "expansion", "basics", "--out", str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'd' / 'basics-run'} holds a run with other "
                                              "settings (seed 1 there, 0 now)")
    assert not (tmp_path / "d" / "expansion").exists()  # refused before the first act ran
    (tmp_path / "d" / "bitune").write_text("mine")
    assert main(["demo", "bitune", "--out", str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'd'}: {tmp_path / 'd' / 'bitune'} is a file, not " \
                                      "a directory: the bitune act writes there; move it or pass another --out\n"
    monkeypatch.setenv("KPRO_DEMO_WORKERS", "0")
    assert main(["demo", "basics", "--out", str(tmp_path / "e")]) == 1
    assert "KPRO_DEMO_WORKERS must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_a_file_where_an_act_writes_is_refused_before_any_act_naming_out(tmp_path, capsys, monkeypatch):
    """With --out/basics a file (the basics model's directory; its run's settings are checked in basics-run), the
    basics act trained all its steps (after the whole expansion act, in a full demo) and only then failed with
    `.../basics exists and is not a directory`, naming no option. Every act's directory, and a reproduction's,
    is now checked before the first act, and the error names --out."""
    from kpro.cli import main

    def trained(*args, **kwargs):
        raise AssertionError("trained before refusing the file")
    monkeypatch.setattr(demo, "fit", trained)
    monkeypatch.setattr(expansion, "run_jobs_reporting", trained)
    out = tmp_path / "d"
    out.mkdir()
    for act in ("basics", "basics-run", "bitune"):
        (out / act).write_text("mine")
        assert main(["demo", "expansion", "basics", "bitune", "--out", str(out)]) == 1
        assert capsys.readouterr().err == f"error: --out {out}: {out / act} is a file, not a directory: the " \
                                          f"{act.removesuffix('-run')} act writes there; move it or pass another " \
                                          "--out\n"
        (out / act).unlink()
    assert not (out / "expansion").exists()
    (out / "expansion-curves").write_text("mine")
    assert main(["reproduce", "expansion-curves", "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --out {out}: {out / 'expansion-curves'} is a file, not a " \
                                      "directory: the expansion-curves reproduction writes there; move it or pass " \
                                      "another --out\n"


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two runs given one --out both resumed from its checkpoints and appended to the same metrics and results.
    A run holds its directory (and each act its own) until it ends; the system releases the hold of a killed
    one."""
    from kpro.cli import main
    from kpro.demo import act_settings
    from kpro._run_lock import LOCK_FILE, DirectoryInUse, holding

    def hold(directory):
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kpro._run_lock import "
                                   "holding\nwith holding(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
                                   str(directory)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "held\n"
        return holder

    holder = hold(tmp_path / "d")
    try:
        assert main(["demo", "basics", "--out", str(tmp_path / "d")]) == 1
        assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'd'} is in use by another kpro run (process "
                                                  f"{holder.pid}): two runs there would resume from")
        assert not (tmp_path / "d" / "basics-run").exists()
    finally:
        holder.kill()  # SIGKILL: nothing of the holder's runs to release the lock
        holder.wait()
    holder = hold(tmp_path / "i")
    try:  # an act called from Python holds its own directory
        with pytest.raises(DirectoryInUse, match=f"process {holder.pid}"):
            internalization.act_internalization(tmp_path / "i", explicit_steps=6, steps_per_token=2, after_steps=4,
                                                decay_steps=0, warmup_steps=1, valid_size=4, test_size=4,
                                                eval_every=4, workers=1)
        assert not (tmp_path / "i" / act_settings.SETTINGS_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    with holding(tmp_path / "d"), holding(tmp_path / "d"):  # released by the kill; re-entrant in one process
        assert (tmp_path / "d" / LOCK_FILE).read_text() == str(os.getpid())
    assert not (tmp_path / "d" / LOCK_FILE).exists()  # removed by the run that ends


@pytest.mark.parametrize("act, arguments, message", [
    (internalization.act_internalization, dict(steps_per_token=0), "steps_per_token must be an integer >= 1, got 0"),
    (internalization.act_internalization, dict(test_size=0), "test_size must be an integer >= 1, got 0"),
    (internalization.act_internalization, dict(eval_every=0), "eval_every must be an integer >= 1, got 0"),
    (internalization.act_internalization, dict(explicit_steps=0), "explicit_steps must be an integer >= 1, got 0"),
    (internalization.act_internalization, dict(lr=0.0), "lr must be a positive number, got 0.0"),
    *[(internalization.act_internalization, dict(weight_decay=bad),  # passed the check, and "0.01" failed unnamed
       f"act_internalization: weight_decay must be a number from 0 to below 1, got {bad!r}")
      for bad in (math.nan, -1.0, 1.0, "0.01", True)],
    (internalization.act_internalization, dict(hidden=130), "hidden_size=130 is not divisible by num_attention"),
    (bitune.act_bitune, dict(held_out=0), "held_out must be an integer >= 1, got 0"),
    (expansion.act_expansion, dict(eval_examples=0), "eval_examples must be an integer >= 1, got 0"),
    (expansion.act_expansion, dict(seeds=0), "seeds must be an integer >= 1, got 0"),
    (expansion.act_expansion, dict(general_share=1.0), "general_share must be a number from 0 to below 1"),
    (demo.act_basics, dict(steps=0), "steps must be an integer >= 1, got 0"),
    (seeds.reproduce_internalization_seeds, dict(seeds=0), "seeds must be an integer >= 1, got 0"),
    (seeds.reproduce_bitune_seeds, dict(seeds=0), "seeds must be an integer >= 1, got 0"),
])
def test_an_acts_bad_arguments_are_refused_before_any_work(tmp_path, act, arguments, message):
    """They failed after minutes of training (steps_per_token=0 after the explicit phase, test_size=0 after all of
    it), under internal names, or not at all (seeds=0 reported 'shown on 0 of 0 seeds')."""
    with pytest.raises(ValueError, match=re.escape(message)):
        act(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-run").exists()


def test_kpro_demo_workers_takes_ascii_digits_only(monkeypatch):
    """str.isdigit() passed '²' to int(), which raised "invalid literal for int() with base 10", naming nothing,
    and took the Arabic-Indic '٣' as 3."""
    from kpro.demo.parallel import default_workers

    monkeypatch.setenv("KPRO_DEMO_WORKERS", "3")
    assert default_workers() == 3
    for value in ("²", "٣", "0", "-1", "1.5", " 2", "abc"):
        monkeypatch.setenv("KPRO_DEMO_WORKERS", value)
        with pytest.raises(ValueError, match=re.escape(f"KPRO_DEMO_WORKERS must be a positive integer, got {value!r}")):
            default_workers()


def test_run_jobs_refuses_fewer_than_one_worker():
    for workers in (0, -1, True):  # 0 and -1 ran the jobs one at a time, silently
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            run_jobs([(functools.partial(time.sleep, 0), {})] * 2, workers=workers)


def test_printed_figures_agree_with_their_verdicts():
    """0.85 - 0.65 is 0.19999999999999996: the expansion act printed a margin of +0.20 beside NOT SHOWN where
    0.2 was needed; 159 of 200 printed as 0.80 beside a needed 0.8, and 2 CoT tokens over 500 answers as 0.0
    beside a verdict that needs none."""
    run = lambda exp, ctrl: {"expanded": {"general": exp, "domain": 1.0}, "control": {"general": ctrl, "domain": 1.0}}
    assert expansion.verdict([run(0.85, 0.65)]) == (True, 0.2)
    assert expansion.verdict([run(0.85, 0.655)])[0] is False
    assert claims.figure(159 / 200, 0.8, 159 / 200 >= 0.8) == "0.795"
    assert claims.figure(0.8, 0.8, True) == "0.80" and claims.figure(0.2, 0.2, True, sign=True) == "+0.20"
    assert claims.figure(0.8996, 0.9, False, digits=3) == "0.8996"
    assert claims.in_standard_errors(0.0304, 0.01, 3, True) == "+3.04 standard errors"
    assert claims.in_standard_errors(0.0296, 0.01, 3, False) == "+3.0 standard errors"
    assert internalization.cot_figure(2 / 500) == "0.0040" and internalization.cot_figure(0.0) == "0.0"
    assert internalization.cot_figure(8.0) == "8.0"


def test_a_margin_of_exactly_three_standard_errors_is_not_shown():
    """The claims need a margin of more than 3 standard errors, but 72/72 against 64/72 over 72 questions a
    side (a margin of 1/9, a standard error of 1/27) computed as 3.0000000000000004 and was SHOWN, printed as
    "+3.000000000 standard errors (needs > 3)"; so were bitune's 18/45 against 6/45 and the seeds' verdict."""
    internal = {"internalized": {"accuracy": 72 / 72, "cot_tokens": 0.0}, "no CoT": {"accuracy": 64 / 72}}
    shown, margin, se = internalization.verdict(internal, 72)
    assert not shown and claims.in_standard_errors(margin, se, 3) == "+3.0 standard errors"
    assert internalization.verdict({**internal, "no CoT": {"accuracy": 63 / 72}}, 72)[0]  # +3.2
    assert not bitune.verdict({"bitune": {"right": 18 / 45}, "only_causal": {"right": 6 / 45}}, 45)[0]
    assert bitune.verdict({"bitune": {"right": 19 / 45}, "only_causal": {"right": 6 / 45}}, 45)[0]
    for questions, a, b in ((72, 72 / 72, 64 / 72), (90, 72 / 90, 54 / 90)):
        assert not seeds.seeds_verdict([a - b] * 2, a, b, questions)[0], questions
    assert claims.exceeds_standard_errors(1.0, 0.0, (72, 72)) and not claims.exceeds_standard_errors(0.0, 0.0, (72, 72))
    assert not claims.exceeds_standard_errors(math.nan, 0.1, (72, 72))
    assert not claims.exceeds_standard_errors(0.5, math.nan, (72, 72))


def test_all_right_against_all_wrong_is_shown_only_on_enough_questions():
    """A standard error of 0 (one side all right, the other all wrong) made any positive margin SHOWN: 1 question
    right against 1 wrong passed every act's verdict, while 5/5 against 4/5 did not. Such a split is shown where it
    is as unlikely between equal accuracies as 3 standard errors (1 in 741): 1 / C(2n, n) from n = 6 on."""
    assert [n for n in range(1, 9) if claims.exceeds_standard_errors(1.0, 0.0, (n, n))] == [6, 7, 8]
    assert claims.clean_split(6, 6) == 1 / 924 < claims.normal_tail(3) < claims.clean_split(5, 5) == 1 / 252
    assert claims.normal_tail(3) == pytest.approx(0.0013499, rel=1e-4)
    perfect = {"internalized": {"accuracy": 1.0, "cot_tokens": 0.0}, "no CoT": {"accuracy": 0.0}}
    assert not internalization.verdict(perfect, 5)[0] and internalization.verdict(perfect, 6)[0]
    split = {"bitune": {"right": 1.0}, "only_causal": {"right": 0.0}}
    assert not bitune.verdict(split, 1)[0] and not bitune.verdict(split, 5)[0] and bitune.verdict(split, 6)[0]
    assert not seeds.seeds_verdict([1.0] * 2, 1.0, 0.0, 5)[0] and seeds.seeds_verdict([1.0] * 2, 1.0, 0.0, 6)[0]
    assert claims.in_standard_errors(1.0, 0.0, 3, questions=(5, 5)) == (
        "all right against all wrong, no spread to count standard errors in; between equal accuracies a split this "
        "clean has a chance of 1 in 252 (3 standard errors: 1 in 741)")
    assert claims.in_standard_errors(0.0, 0.0, 3, questions=(5, 5)) == "no spread to measure it against"
    with pytest.raises(ValueError, match="positive"):
        claims.clean_split(0, 3)


def test_a_verdict_given_a_figure_that_is_not_finite_is_not_shown():
    """A NaN on expansion's second seed passed (min() skipped it), as did an infinite accuracy or loss wherever a
    difference or a fall was asked for; a NaN accuracy passed the Bitune seeds' verdict with a standard error of 0
    (max(0.0, nan) is 0.0), and a NaN gain crashed statistics.stdev."""
    nan, inf = math.nan, math.inf
    run = lambda expanded, control, domain=1.0: {"expanded": {"general": expanded, "domain": domain},
                                                 "control": {"general": control, "domain": 1.0}}
    shown, margin = expansion.verdict([run(0.9, 0.1), run(0.9, nan)])
    assert not shown and math.isnan(margin)
    assert not expansion.verdict([run(0.9, 0.1), run(0.9, 0.1, domain=nan)])[0]
    assert not expansion.verdict([run(inf, 0.1)])[0]
    internal = lambda accuracy, no_cot, cot=0.0: {"internalized": {"accuracy": accuracy, "cot_tokens": cot},
                                                  "no CoT": {"accuracy": no_cot, "cot_tokens": 0.0}}
    for results in (internal(inf, 0.1), internal(0.95, -inf), internal(0.95, nan), internal(0.95, 0.1, nan)):
        assert not internalization.verdict(results, 500)[0], results
    for a, b in ((inf, 0.1), (0.9, -inf), (nan, 0.1)):
        assert not bitune.verdict({"bitune": {"right": a}, "only_causal": {"right": b}}, 300)[0], (a, b)
    shown, gain, se, seed_se, binomial_se = seeds.seeds_verdict([0.1, nan, 0.1], 0.8, 0.7, 3000)
    assert not shown and math.isnan(gain) and math.isnan(se)
    shown, gain, se, seed_se, binomial_se = seeds.seeds_verdict([0.1] * 3, nan, 0.7, 3000)
    assert not shown and gain == pytest.approx(0.1) and math.isnan(se) and math.isnan(binomial_se)
    assert not seeds.seeds_verdict([0.1] * 3, inf, 0.7, 3000)[0]  # math.sqrt refused it
    answers = ["Paris"]
    assert not smollm2.verdict(0.0, [2.0, -inf], answers, answers) and not smollm2.verdict(nan, [2, 1], [], [])


def test_a_claim_line_names_the_figures_that_are_not_finite(tmp_path, capsys, monkeypatch):
    nan, inf = math.nan, math.inf
    assert claims.claim_line("x", "it works", False, "1 vs 0", {"a": 1.0, "b": nan, "c": -inf}) == \
        "claim (x): it works -- NOT SHOWN by this run: 1 vs 0; not a finite number: b (nan), c (-inf)"
    assert claims.claim_line("x", "it works", True, "1 vs 0", {"a": 1.0}).endswith("by this run: 1 vs 0")
    bitune_results = {"bitune": {"right": 0.5}, "only_causal": {"right": nan}}
    assert claims.not_finite(bitune.verdict_inputs(bitune_results)) == ["only_causal's accuracy on right"]
    internal = {"internalized": {"accuracy": 0.95, "cot_tokens": inf}, "no CoT": {"accuracy": nan, "cot_tokens": 0}}
    assert claims.not_finite(internalization.verdict_inputs(internal)) == ["internalized CoT tokens",
                                                                           "no CoT accuracy"]
    _, line = smollm2.claim(0.0, [2.0, 1.5, nan], ["Paris"], ["Paris"])
    assert line.endswith("held-out loss 2.000 -> nan, 1/1 answers unchanged; not a finite number: held-out loss "
                         "after (nan)")
    # the expansion act, its jobs' scores made up: a NaN general accuracy of the control
    arms = [{"layers": 6, "new_blocks": [2, 5], "plan": "plan", "trainable": 1,
             "scores": {"domain": 0.95, "general": 0.95}},
            {"layers": 4, "new_blocks": [], "plan": "", "trainable": 1, "scores": {"domain": 0.97, "general": nan}}]
    calls = iter([[{"domain": 0.0, "general": 0.99}], arms])
    monkeypatch.setattr(expansion, "run_jobs_reporting", lambda jobs, workers, groups: next(calls))
    assert not expansion._run(tmp_path, 400, 800, 2, 0.03, 1e-3, 200, [0], 1)["claim_shown"]
    shown, figures = claim_of(capsys.readouterr().out, "expansion")
    assert not shown and figures.endswith("; not a finite number: control general accuracy on seed 0 (nan)")
    arms[1]["scores"]["general"] = 0.40  # the same run with a finite figure there: shown, and nothing named
    calls = iter([[{"domain": 0.0, "general": 0.99}], arms])
    assert expansion._run(tmp_path, 400, 800, 2, 0.03, 1e-3, 200, [0], 1)["claim_shown"]
    shown, figures = claim_of(capsys.readouterr().out, "expansion")
    assert shown and figures.endswith("domain learned by both (>= 0.9): yes, lowest 0.95")

    class Act:  # the bitune act over seeds, its accuracies made up: only_causal's a NaN on seed 1
        check = staticmethod(lambda out_dir, seed, **act: None)

        def __call__(self, out_dir, seed, **act):
            return {"lora": {"left": 0.5, "right": 0.5}, "bitune": {"left": 0.5, "right": 0.9},
                    "only_causal": {"left": 0.5, "right": nan if seed == 1 else 0.8}}
    monkeypatch.setattr(seeds, "act_bitune", Act())
    assert not seeds.reproduce_bitune_seeds(tmp_path / "seeds", seeds=3)["claim_shown"]  # stdev raised before
    shown, figures = claim_of(capsys.readouterr().out, "bitune")
    assert not shown and figures.endswith("; not a finite number: gain on seed 1 (nan), only_causal's mean "
                                          "accuracy on right (nan)")


def test_reversal_task_format():
    prompt, answer = demo.reversal_task(random.Random(0))
    assert prompt.endswith(">") and answer == prompt[:-1][::-1] and 3 <= len(answer) <= 8


def test_basics_verdict_both_ways():
    examples = [("ab>", "ba")] * 10
    right, wrong = ["ba"] * 10, ["ba"] * 8 + ["ab"] * 2
    assert demo.verdict(right, right, examples) == (True, 1.0)
    assert demo.verdict(wrong, wrong, examples) == (False, 0.8)  # below 0.9
    assert demo.verdict(right, wrong, examples) == (False, 0.8)  # the reload changed answers
    # a reload that changed an answer but still meets the bar: the claim is the same answers after reloading
    reloaded = ["ba"] * 9 + ["xx"]
    assert demo.verdict(reloaded, reloaded, examples) == (True, 0.9)
    assert demo.verdict(right, reloaded, examples) == (False, 0.9)


def test_basics_act_trains_saves_and_reloads(tmp_path, capsys, monkeypatch):
    result = demo.act_basics(tmp_path / "basics", steps=30)
    out, err = capsys.readouterr()
    assert "step    30/30  loss" in err and "reloaded" in out  # the progress on stderr, the act's story on stdout
    tok = kpro.load_tokenizer(tmp_path / "basics")
    reloaded = kpro.load_pretrained(tmp_path / "basics")
    assert isinstance(tok, kpro.CharTokenizer) and reloaded.config.num_hidden_layers == 4
    held_out = [demo.reversal_task(random.Random(10_000 + i)) for i in range(200)]
    assert result["accuracy"] == demo.accuracy(reloaded, tok, held_out)  # the reported accuracy is the saved model's
    shown, figures = claim_of(out, "basics")
    assert shown == result["claim_shown"] == (result["accuracy"] >= demo.LEARNED and result["same_answers"] == 200)
    assert f"held-out accuracy {result['accuracy']:.2f}" in figures and f"{result['same_answers']}/200" in figures
    # 30 steps stay below the threshold: the act's SHOWN side, on made-up answers (190 of 200 right, before and
    # after the reload) after one real step
    monkeypatch.setattr(demo, "answers", lambda model, tok, examples: ["" if i < 10 else answer
                                                                       for i, (_, answer) in enumerate(examples)])
    result = demo.act_basics(tmp_path / "made-up", steps=1)
    shown, figures = claim_of(capsys.readouterr().out, "basics")
    assert shown and result["claim_shown"] and (result["accuracy"], result["same_answers"]) == (0.95, 200)
    assert figures == ("held-out accuracy 0.95 after reloading (needs >= 0.9), 200/200 answers unchanged by the "
                       "save and reload")


def test_internalization_verdict_both_ways():
    def results(internalized, no_cot, cot_tokens=0.0):
        return {"internalized": {"accuracy": internalized, "cot_tokens": cot_tokens},
                "no CoT": {"accuracy": no_cot, "cot_tokens": 0.0}}
    shown, margin, se = internalization.verdict(results(0.95, 0.35), 500)
    assert shown and margin == pytest.approx(0.6) and se == pytest.approx(
        ((0.95 * 0.05 + 0.35 * 0.65) / 500) ** 0.5)
    assert not internalization.verdict(results(0.89, 0.35), 500)[0]  # below 0.9
    assert not internalization.verdict(results(0.95, 0.35, cot_tokens=0.5), 500)[0]  # still writes CoT
    assert not internalization.verdict(results(0.95, 0.93), 500)[0]  # not clearly above no CoT (~1.2 se)
    assert internalization.verdict(results(1.0, 0.0), 500)[0]  # no spread, a margin of 1
    assert internalization.verdict(results(0.9, 0.1), 500)[0]  # 0.9 exactly is enough, with a wide margin
    assert not internalization.verdict(results(1.0, 1.0), 500)[0]  # no spread, no margin


def test_a_killed_internalization_act_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """The act saved only at a run's end or on Ctrl-C: a killed run (an ended session) lost everything, an hour
    of the 3x3 reproduction. It saves every SAVE_EVERY steps now, and the resumed act ends where an unbroken one
    does, bit for bit."""
    tiny = dict(explicit_steps=6, steps_per_token=2, after_steps=4, decay_steps=2, warmup_steps=1, valid_size=4,
                test_size=4, eval_every=4, hidden=32, workers=1)
    monkeypatch.setattr(internalization, "SAVE_EVERY", 5)
    internalization.act_internalization(tmp_path / "whole", **tiny)

    class Killed(Exception):
        pass

    class KillAt(Callback):
        def on_step_end(self, run, metrics):
            if run.step == 13:
                raise Killed

    fit_internalization = internalization.fit_internalization

    def killed_in_the_removal(model, examples, out_dir, **options):
        if Path(out_dir).parent.name == "internalized":
            options["callbacks"] = [*options["callbacks"], KillAt()]
        return fit_internalization(model, examples, out_dir, **options)
    monkeypatch.setattr(internalization, "fit_internalization", killed_in_the_removal)
    with pytest.raises(Killed):
        internalization.act_internalization(tmp_path / "killed", **tiny)
    run = tmp_path / "killed" / "internalized" / "run"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000010"]
    monkeypatch.setattr(internalization, "fit_internalization", fit_internalization)
    internalization.act_internalization(tmp_path / "killed", **tiny)
    for name in ("explicit-cot", "internalized", "no-cot"):
        model = Path(name) / "model" / "model.safetensors"
        assert (tmp_path / "killed" / model).read_bytes() == (tmp_path / "whole" / model).read_bytes(), name


def test_explicit_note_only_below_the_recipes_target():
    note = internalization.explicit_note(0.706, 2500, 12000)
    assert note == ("  the explicit model stopped at 0.706 after its fixed 2,500 steps, short of the recipe's 0.95; "
                    "the internalized model trained 12,000 steps more from it")
    assert internalization.explicit_note(0.9499, 2500, 12000) is not None
    assert internalization.explicit_note(0.95, 2500, 12000) is None
    assert internalization.explicit_note(1.0, 2500, 12000) is None


def test_internalization_act_prints_the_verdict_of_its_numbers(tmp_path, capsys, monkeypatch):
    results = internalization.act_internalization(tmp_path, explicit_steps=6, steps_per_token=2, after_steps=4,
                                                  decay_steps=2, warmup_steps=2, eval_every=4, valid_size=4,
                                                  test_size=8, hidden=32, workers=1, lr=5e-4, explicit_lr=1e-3)
    out = capsys.readouterr().out
    assert {"explicit CoT", "no CoT", "internalized"} <= set(results)
    for name in ("explicit CoT", "no CoT", "internalized"):
        assert f"  {name:13s} accuracy {results[name]['accuracy']:.3f}" in out
    assert results["internalized"]["steps"] == results["no CoT"]["steps"] == 6 + 8 * 2 + 4
    shown, figures = claim_of(out, "internalization")
    assert shown == results["claim_shown"] == internalization.verdict(results, 8)[0]
    assert (f"internalized {results['internalized']['accuracy']:.3f} with "
            f"{results['internalized']['cot_tokens']:.1f} CoT tokens") in figures
    assert f"no CoT {results['no CoT']['accuracy']:.3f}" in figures
    # Six explicit steps leave the explicit model far below the recipe's 0.95: the act says so, with its numbers.
    note = internalization.explicit_note(results["explicit CoT"]["accuracy"], 6, 8 * 2 + 4)
    assert note is not None and note + "\n" in out
    # The internalized model kept its best weights once the CoT was gone (validation at 12, 16, 20... of 20).
    assert results["selected"]["internalized"]["step"] in (16, 20)
    # The explicit phase ran at explicit_lr; the removal and the no-CoT control at lr, both decaying it over
    # their last decay_steps: the same 2 steps of the act. The two runs from scratch, the explicit phase and the
    # no-CoT control, warm up over their first warmup_steps; the removal goes on from the explicit model.
    runs = ("explicit-cot", "internalized", "no-cot")
    logs = {run: (tmp_path / run / "run" / "metrics.jsonl").read_text() for run in runs}
    rates = {run: [json.loads(line)["lr"] for line in log.splitlines()] for run, log in logs.items()}
    assert rates == {"explicit-cot": [5e-4] + [1e-3] * 5, "internalized": [5e-4] * 19 + [2.5e-4],
                     "no-cot": [2.5e-4] + [5e-4] * 24 + [2.5e-4]}
    with pytest.raises(ValueError, match=r"decay_steps must be an integer from 0 to after_steps \(4\)"):
        internalization.act_internalization(tmp_path / "bad", after_steps=4, decay_steps=5)
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer from 0 to explicit_steps - 1 \(5\)"):
        internalization.act_internalization(tmp_path / "bad", explicit_steps=6, warmup_steps=6)
    # The tiny runs stay below the thresholds: the act's SHOWN side, its training skipped and each saved model's
    # held-out evaluation made up (right answers of 20, CoT tokens written, examples/s).
    from kpro.internalize.evaluation import Evaluation, Prediction
    made_up = {"explicit-cot": (20, 4, 500.0), "no-cot": (7, 0, 2000.0), "internalized": (19, 0, 2000.0)}

    class Saved:  # the model the act loads from DIR/model, known by DIR
        def __init__(self, path):
            self.name = Path(path).parent.name

        def eval(self):
            return self

    def evaluate(model, tok, examples, batch_size=64):
        right, cot, speed = made_up[model.name]
        right = min(right, len(examples))
        predictions = [Prediction(ids=(5,) * cot + (tok.eos_id,), cot="5 " * cot, answer=example.answer,
                                  finished=True, correct=i < right) for i, example in enumerate(examples)]
        return Evaluation(right / len(examples), speed, len(examples) / speed, right, len(examples), predictions)
    monkeypatch.setattr(internalization, "run_jobs_reporting",
                        lambda jobs, workers, groups: [{"selected": {"step": 20}}, {"selected": {"step": 26}}])
    monkeypatch.setattr(internalization, "load_pretrained", Saved)
    monkeypatch.setattr(internalization, "evaluate", evaluate)
    results = internalization.act_internalization(tmp_path / "made-up", explicit_steps=6, steps_per_token=2,
                                                  after_steps=4, decay_steps=2, warmup_steps=2, eval_every=4,
                                                  valid_size=4, test_size=20, hidden=32, workers=1)
    shown, figures = claim_of(capsys.readouterr().out, "internalization")
    assert shown and results["claim_shown"]
    assert [results[name]["accuracy"] for name in ("explicit CoT", "no CoT", "internalized")] == [1.0, 0.35, 0.95]
    assert figures == ("internalized 0.950 with 0.0 CoT tokens, no CoT 0.350 (margin +0.600 = +5.1 standard errors; "
                       "needs >= 0.9 with 0 CoT tokens and a margin > 3 standard errors), 4.0x the explicit model's "
                       "examples/s")  # 0.6 / sqrt((0.95 * 0.05 + 0.35 * 0.65) / 20) = 5.12


def test_expansion_curves_score_the_runs_they_report(tmp_path, capsys):
    from kpro.demo.expansion_curves import reproduce_expansion_curves
    result = reproduce_expansion_curves(tmp_path, seeds=(0,), every=2, pretrain_steps=4, domain_steps=4,
                                        eval_examples=6, workers=1)
    out = capsys.readouterr().out
    for arm in expansion.ARMS:
        points = result["curves"]["seed-0"][arm]
        assert [step for step, _, _ in points] == [2, 4]
        assert f"seed 0 {expansion.ARMS[arm]}: 2: {points[0][1]:.2f}/{points[0][2]:.2f}" in out
        # The last point is the trained model's own score (the run is complete: train_arm reuses it).
        with one_thread():
            final = expansion.train_arm(tmp_path / "seed-0", 0, arm, steps=4, new_blocks=expansion.NEW_BLOCKS,
                                        general_share=expansion.GENERAL_SHARE, lr=expansion.DOMAIN_LR,
                                        eval_examples=6)["scores"]
        assert points[-1][1:] == (final["domain"], final["general"])
    for every in (-2, 1.5, True):
        with pytest.raises(ValueError, match="every must be a positive"):
            expansion.HeldOutScores(every, 6)
    # another `every` in the same directory printed the old runs' curves under the new header
    with pytest.raises(ValueError, match=r"holds a run with other settings \(every 2 there, 1 now\)"):
        reproduce_expansion_curves(tmp_path, seeds=(0,), every=1, pretrain_steps=4, domain_steps=4, eval_examples=6,
                                   workers=1)


def test_bitune_task_needs_look_ahead_only_on_the_right():
    assert bitune.records([3, 8, 1, 0, 7, 5], "left") == 2 and bitune.records([3, 8, 1, 0, 7, 5], "right") == 3
    prompt, answer, side = bitune.question(random.Random(0), "right")
    digits = [int(d) for d in prompt.split()[:-1]]
    assert prompt.split()[-1] == side == "right" and len(set(digits)) == bitune.DIGITS
    assert answer == str(bitune.records(digits, "right"))


def test_bitune_verdict_both_ways():
    def results(bitune_right, only_causal_right):
        return {"bitune": {"right": bitune_right}, "only_causal": {"right": only_causal_right}}
    shown, gain, se = bitune.verdict(results(0.80, 0.70), 1000)
    assert shown and gain == pytest.approx(0.10) and se == pytest.approx(((0.8 * 0.2 + 0.7 * 0.3) / 1000) ** 0.5)
    assert bitune.verdict(results(0.76, 0.70), 1000)[0]  # +3.03 standard errors of the difference
    # +2.77: not shown (+3.9 counted on 2,000 questions, +4.0 against Bitune's standard error alone)
    assert not bitune.verdict(results(0.755, 0.70), 1000)[0]
    assert not bitune.verdict(results(0.726, 0.720), 1000)[0]  # the pilot's seed 0: +0.3 standard errors
    assert not bitune.verdict(results(0.70, 0.80), 1000)[0]  # a loss is never shown


def test_bitune_seeds_verdict_takes_the_larger_standard_error():
    shown, gain, se, seed_se, binomial_se = seeds.seeds_verdict([0.05, 0.06, 0.04], 0.8, 0.75, 3000)
    assert shown and gain == pytest.approx(0.05) and seed_se == pytest.approx(0.01 / 3 ** 0.5)
    assert binomial_se == pytest.approx(((0.8 * 0.2 + 0.75 * 0.25) / 3000) ** 0.5) and se == binomial_se
    # The seeds agree (no spread): the questions' standard error, 0.0108, rules, and +0.03 is below 3 of it.
    assert seeds.seeds_verdict([0.03] * 3, 0.8, 0.75, 3000) == (False, pytest.approx(0.03), pytest.approx(
        binomial_se), 0.0, pytest.approx(binomial_se))
    # The same mean gain, spread over the seeds: the seeds' standard error rules, and it is not shown.
    shown, gain, se, seed_se, _ = seeds.seeds_verdict([0.25, -0.15, 0.05], 0.8, 0.75, 3000)
    assert not shown and gain == pytest.approx(0.05) and se == seed_se


def test_bitune_act_prints_the_verdict_of_its_numbers(tmp_path, capsys, monkeypatch):
    results = bitune.act_bitune(tmp_path / "bitune", pretrain_steps=4, tune_steps=2, held_out=20, train_questions=64,
                                workers=1)
    out = capsys.readouterr().out
    assert set(bitune.METHODS) <= set(results) and "held-out accuracy ± standard error" in out
    shown, figures = claim_of(out, "bitune")
    assert shown == results["claim_shown"] == bitune.verdict(results, 20)[0]
    assert f"right {results['bitune']['right']:.3f} vs {results['only_causal']['right']:.3f}" in figures
    assert f"gain {results['bitune']['right'] - results['only_causal']['right']:+.3f}" in figures
    assert "the demo's short run" in figures
    # The reported accuracy is the saved adapters' on the held-out questions.
    test_rng = random.Random(10_000)
    test = [bitune.question(test_rng, side) for side in bitune.SIDES for _ in range(20)]
    tok = kpro.load_tokenizer(tmp_path / "bitune" / "base")
    tuned = kpro.bitune.load_tuned(kpro.load_pretrained(tmp_path / "bitune" / "base"),
                                   tmp_path / "bitune" / "bitune" / "adapters")
    with one_thread():
        answers = kpro.bitune.generate_answers(tuned, tok, [q for q, _, _ in test], max_new_tokens=2)
    assert results["bitune"]["right"] == sum(a == w for a, (_, w, _) in zip(answers[20:], test[20:])) / 20
    # The tiny run stays below the threshold: the act's SHOWN side, its tuning jobs' results made up
    made_up = {"lora": {"left": 0.9, "right": 0.3}, "only_causal": {"left": 0.9, "right": 0.4},
               "bitune": {"left": 0.9, "right": 0.95}}
    monkeypatch.setattr(bitune, "run_jobs", lambda jobs, workers: [{**made_up[job["out_dir"].name],
                                                                    "train_seconds": 1.0} for _, job in jobs])
    results = bitune.act_bitune(tmp_path / "made-up", pretrain_steps=1, tune_steps=2, held_out=20,
                                train_questions=64, workers=1)
    shown, figures = claim_of(capsys.readouterr().out, "bitune")
    assert shown and results["claim_shown"] and results["bitune"]["right"] == 0.95
    # 0.55 / sqrt((0.95 * 0.05 + 0.4 * 0.6) / 20) = 4.59
    assert figures.startswith("right 0.950 vs 0.400, gain +0.550 = +4.6 standard errors (needs > 3); one seed, 2 "
                              "tuning steps, 20 questions a side; the demo's short run")


def test_expansion_tasks_format():
    prompt, answer = expansion.domain_task(random.Random(0))
    digits = prompt[:-1]
    assert prompt.endswith("=") and digits.isdigit() and answer == "".join("abcdefghij"[int(d)] for d in digits)
    general_prompt, general_answer = expansion.reversal_task(random.Random(0))
    assert general_answer == general_prompt[:-1][::-1]  # the general task reverses; the domain task keeps the order


def test_expansion_verdict_asks_for_the_margin_on_every_seed():
    def run(expanded, control, domain=(1.0, 1.0)):
        return {"expanded": {"general": expanded, "domain": domain[0]},
                "control": {"general": control, "domain": domain[1]}}
    assert expansion.verdict([run(0.9, 0.1), run(0.8, 0.0)]) == (True, pytest.approx(0.8))
    assert expansion.verdict([run(0.96, 0.65), run(0.94, 0.61)]) == (True, pytest.approx(0.31))  # 5%'s seeds
    assert expansion.verdict([run(0.9, 0.1), run(0.95, 0.8)]) == (False, pytest.approx(0.15))  # one seed's margin
    assert expansion.verdict([run(0.88, 0.29), run(0.59, 0.47)]) == (False, pytest.approx(0.12))  # 3%'s seed 4
    assert not expansion.verdict([run(0.75, 0.05)])[0]  # a wide margin, but the general task is not kept
    assert not expansion.verdict([run(0.9, 0.1, domain=(0.5, 1.0))])[0]  # the expanded model missed the domain
    assert not expansion.verdict([run(0.9, 0.1, domain=(1.0, 0.8))])[0]  # the control missed it
    # Each threshold is met exactly: domain 0.9 by both, 0.8 kept and a margin of 0.2 (0.8 - 0.6 is 0.20000000000000007)
    assert expansion.verdict([run(0.9, 0.1, domain=(0.9, 0.9))]) == (True, pytest.approx(0.8))
    assert expansion.verdict([run(0.8, 0.6)]) == (True, 0.2)
    assert expansion.verdict([run(0.8, 0.6), run(0.85, 0.65)]) == (True, 0.2)  # 0.19999999999999996 on the second
    assert not expansion.verdict([run(0.79, 0.1)])[0] and not expansion.verdict([run(0.8, 0.61)])[0]


def test_smollm2_verdict_both_ways():
    """Made-up numbers on each side of each condition (the act itself needs the real model)."""
    answers = ["Paris", "Tokyo"]
    assert smollm2.verdict(0.0, [1.919, 1.886, 1.862], answers, list(answers))
    assert smollm2.verdict(smollm2.EXACT, [1.919, 2.5, 1.862], answers, answers)  # at the threshold; the last loss
    assert not smollm2.verdict(1.04e-5, [1.919, 1.862], answers, answers)  # the logits moved
    assert not smollm2.verdict(0.0, [1.919, 1.919], answers, answers)  # the loss did not fall
    assert not smollm2.verdict(0.0, [1.862, 1.5, 1.919], answers, answers)  # it rose
    assert not smollm2.verdict(0.0, [1.919, 1.862], answers, ["Paris", "Kyoto"])  # a general answer changed


def test_the_smollm2_claim_prints_its_figures_as_the_verdict_compares_them():
    """A drift of 1.04e-5 printed as 1.0e-05 beside "needs <= 1e-05" and NOT SHOWN, and a held-out loss that fell
    from 2.3454 to 2.3451 as 2.345 -> 2.345 beside SHOWN."""
    answers = ["Paris"] * 5
    shown, line = smollm2.claim(1.04e-5, [2.0, 1.0], answers, answers)
    assert not shown and "at expansion 1.04e-05 (needs <= 1e-05)," in line
    shown, line = smollm2.claim(0.0, [2.3454, 2.3, 2.3451], answers, answers)
    assert shown and "held-out loss 2.3454 -> 2.3451," in line
    # Far from the thresholds, the figures print as they always have (the runs in benchmarks/RESULTS.md).
    shown, line = smollm2.claim(0.0, [1.9191, 1.886, 1.8622], answers, answers)
    assert shown and line.endswith("SHOWN by this run: logits max |change| at expansion 0.0e+00 (needs <= 1e-05), "
                                   "held-out loss 1.919 -> 1.862, 5/5 answers unchanged")
    assert [smollm2.drift_figure(d) for d in (1e-5, 9.96e-6, 2.3e-7)] == ["1.0e-05", "1.0e-05", "2.3e-07"]
    assert claims.before_after(2.3451, 2.3454) == ("2.345", "2.345")  # it rose: printed as not fallen either
    assert claims.before_after(1.91949, 1.91851) == ("1.9195", "1.9185")


def test_expansion_act_prints_the_verdict_of_its_numbers(tmp_path, capsys, monkeypatch):
    result = expansion.act_expansion(tmp_path / "expansion", pretrain_steps=8, domain_steps=4, eval_examples=8,
                                     seeds=2, workers=1)
    out = capsys.readouterr().out
    assert "(a) expanded, new blocks trained" in out and "(b) control, all weights trained" in out
    assert "both ways, one after the other" in out and "side by side" not in out  # one worker ("side by side" before)
    assert result["new_blocks"] == [2, 5] and [run["seed"] for run in result["runs"]] == [0, 1]  # 4 -> 6 blocks
    shown, figures = claim_of(out, "expansion")
    assert (shown, pytest.approx(result["margin"])) == expansion.verdict(result["runs"])
    assert shown == result["claim_shown"]
    for run in result["runs"]:
        assert f"{run['expanded']['general']:.2f} vs {run['control']['general']:.2f}" in figures
    # The reported scores are the trained models': the saved base scores as reported before training.
    base = kpro.load_pretrained(tmp_path / "expansion" / "seed-1" / "base")
    with one_thread():
        assert expansion.scores(base, 8) == result["runs"][1]["before"]
    # The tiny runs stay below the thresholds: the act's SHOWN side, its jobs' scores made up for two seeds
    arm = lambda domain, general, layers: {"layers": layers, "new_blocks": [2, 5] if layers == 6 else [],
                                           "plan": "plan", "trainable": 1,
                                           "scores": {"domain": domain, "general": general}}
    calls = iter([[{"domain": 0.0, "general": 0.99}] * 2,
                  [arm(0.95, 0.90, 6), arm(0.97, 0.40, 4), arm(0.92, 0.85, 6), arm(0.99, 0.60, 4)]])
    monkeypatch.setattr(expansion, "run_jobs_reporting", lambda jobs, workers, groups: next(calls))
    result = expansion.act_expansion(tmp_path / "made-up", pretrain_steps=8, domain_steps=4, eval_examples=8,
                                     seeds=2, workers=2)
    out = capsys.readouterr().out
    assert "both ways, side by side" in out
    shown, figures = claim_of(out, "expansion")
    assert shown and result["claim_shown"] and result["margin"] == pytest.approx(0.25)
    assert figures == ("general task kept with expansion vs full fine-tuning: 0.90 vs 0.40, 0.85 vs 0.60 (needs >= "
                       "0.8 kept and a margin >= 0.2; smallest margin +0.25); domain learned by both (>= 0.9): yes, "
                       "lowest 0.92")


def test_the_expansion_claim_prints_the_lowest_domain_accuracy_as_compared(tmp_path, capsys, monkeypatch):
    """A domain accuracy of 0.895 printed as 0.90 in the table beside "domain learned by both (>= 0.9): no"."""
    arms = [{"layers": 6, "new_blocks": [2, 5], "plan": "plan", "trainable": 1,
             "scores": {"domain": 0.895, "general": 0.95}},
            {"layers": 4, "new_blocks": [], "plan": "", "trainable": 1, "scores": {"domain": 0.97, "general": 0.40}}]
    calls = iter([[{"domain": 0.0, "general": 0.99}], arms])
    monkeypatch.setattr(expansion, "run_jobs_reporting", lambda jobs, workers, groups: next(calls))
    assert not expansion._run(tmp_path, 400, 800, 2, 0.03, 1e-3, 200, [0], 1)["claim_shown"]
    shown, figures = claim_of(capsys.readouterr().out, "expansion")
    assert not shown and figures.endswith("domain learned by both (>= 0.9): no, lowest 0.895")
    arms[0]["scores"]["domain"] = 0.9  # exactly enough: shown, and printed as compared
    calls = iter([[{"domain": 0.0, "general": 0.99}], arms])
    assert expansion._run(tmp_path, 400, 800, 2, 0.03, 1e-3, 200, [0], 1)["claim_shown"]
    shown, figures = claim_of(capsys.readouterr().out, "expansion")
    assert shown and figures.endswith("domain learned by both (>= 0.9): yes, lowest 0.90")


def test_the_expansion_claim_prints_a_nan_domain_accuracy_as_the_lowest(tmp_path, capsys, monkeypatch):
    """min() skips a NaN after the first value: the control's NaN domain accuracy printed "lowest 0.950000000",
    the expanded model's, padded to 9 decimals trying to agree with "no"."""
    arms = [{"layers": 6, "new_blocks": [2, 5], "plan": "plan", "trainable": 1,
             "scores": {"domain": 0.95, "general": 0.9}},
            {"layers": 4, "new_blocks": [], "plan": "", "trainable": 1, "scores": {"domain": math.nan, "general": 0.5}}]
    calls = iter([[{"domain": 0.0, "general": 1.0}], arms])
    monkeypatch.setattr(expansion, "run_jobs_reporting", lambda jobs, workers, groups: next(calls))
    assert not expansion._run(tmp_path, 400, 800, 2, 0.03, 1e-3, 200, [0], 1)["claim_shown"]
    shown, figures = claim_of(capsys.readouterr().out, "expansion")
    assert not shown and "domain learned by both (>= 0.9): no, lowest nan; not a finite number: control domain " \
                         "accuracy on seed 0 (nan)" in figures


def test_llama_pro_smollm2_averages_the_losses_it_has_and_checks_its_arguments_first(tmp_path, capsys, monkeypatch):
    """The mean loss of the "first 5 steps" and "last 5" divided by 5 whatever the steps: two losses of 3.0
    printed 1.200; steps=0 raised ZeroDivisionError after the original model was measured. Everything heavy is
    stubbed: the model, the data and the training (a loss of 3.0 a step)."""
    module = llama_pro_smollm2
    (tmp_path / "wordnet").mkdir()
    (tmp_path / "wordnet" / "data.noun").write_text("x")
    measured = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    def measure(model, tok, domain_rows, general_rows, reference=None):
        measured.append(model)
        return {"domain_ppl": 1.0, "general_ppl": 1.0, "answers": ["a"] * len(module.QUESTIONS),
                **({} if reference is None else {"answers_unchanged": len(module.QUESTIONS)})}
    stubs = dict(WORDNET=tmp_path / "wordnet", missing_requirement=lambda: None, converted_model=lambda d: (d, None),
                 load_tokenizer=lambda d: None, stdlib_files=lambda: [], split_files=lambda files: ([], []),
                 wordnet_glosses=lambda: [], load_pretrained=lambda d: Model(), expand=lambda model, n: [],
                 train_only=lambda model, ids: None, _measure=measure,
                 packed_rows=lambda tok, docs, seq_len, rows, seed=0: torch.zeros(rows, seq_len, dtype=torch.long),
                 train_steps=lambda model, rows, steps, batch_size, lr, seed: [3.0] * steps)
    for name, value in stubs.items():
        monkeypatch.setattr(module, name, value)
    module.reproduce_llama_pro_smollm2(tmp_path / "out", steps=2)
    out = capsys.readouterr().out
    assert out.count("training loss 3.000 (first 2 steps) -> 3.000 (last 2)") == 2, out
    module.reproduce_llama_pro_smollm2(tmp_path / "out", steps=7)
    assert capsys.readouterr().out.count("training loss 3.000 (first 5 steps) -> 3.000 (last 5)") == 2
    measured.clear()
    for bad, message in [(dict(steps=0), "steps must be an integer >= 1, got 0"),
                         (dict(batch_size=2.5), "batch_size must be an integer >= 1"),
                         (dict(lr=-1e-4), "lr must be a positive number"), (dict(seed=-1), "seed must be an integer"),
                         (dict(new_blocks=0), "new_blocks must be"), (dict(eval_rows=0), "eval_rows must be"),
                         (dict(seq_len=0), "seq_len must be")]:
        with pytest.raises(ValueError, match=f"reproduce_llama_pro_smollm2: {re.escape(message)}"):
            module.reproduce_llama_pro_smollm2(tmp_path / "bad", **bad)
    assert not measured and not (tmp_path / "bad").exists()  # refused before any work


def test_jobs_in_worker_processes_give_the_numbers_of_one_process(tmp_path):
    """Each job seeds everything and runs on one thread: two workers change the wall time, never the numbers."""
    jobs = lambda root: [(expansion.pretrain, dict(out_dir=root / f"seed-{s}", seed=s, steps=3, eval_examples=4))
                         for s in (0, 1)]
    here = run_jobs(jobs(tmp_path / "here"), workers=1)
    there = run_jobs(jobs(tmp_path / "there"), workers=2)
    assert here == there
    for s in (0, 1):
        a = kpro.load_pretrained(tmp_path / "here" / f"seed-{s}" / "base").state_dict()
        b = kpro.load_pretrained(tmp_path / "there" / f"seed-{s}" / "base").state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator thresholds")
def test_workers_keep_freed_memory_for_the_next_step():
    """The pool's workers keep freed memory (kpro.demo.parallel.keep_freed_memory): a step's activations are not
    faulted in again at every step. The control, a spawned process whose allocator returns every freed tensor to
    the system, faults them in every round, so the check can fail."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        plain = pool.apply(_parallel_jobs.page_faults_reallocating, (True,))
    [kept, _] = run_jobs([(_parallel_jobs.page_faults_reallocating, {})] * 2, workers=2)
    assert min(plain) > 10_000, plain  # 64 × 1.4 MB is 22,000 pages, each faulted in again every round
    assert max(kept[1:]) < 1_000, kept  # the first round faults them in, the second a few hundred, then none


def test_jobs_report_progress_until_they_end():
    """progress() runs every poll while the jobs work, not after, in worker processes or, from a thread, in this
    one (with one worker, the act's training printed nothing for its many minutes); a failing job ends the
    polling and raises."""
    calls = []
    jobs = [(functools.partial(time.sleep, 1.0), {})] * 2  # picklable: spawned workers unpickle each job
    assert run_jobs(jobs, workers=2, progress=lambda: calls.append(0), poll_seconds=0.05) == [None] * 2
    assert len(calls) >= 5  # 1 s of sleep after the workers' start-up, polled every 0.05 s
    here = []
    assert run_jobs(jobs, workers=1, progress=lambda: here.append(0), poll_seconds=0.05) == [None] * 2
    assert len(here) >= 20  # 2 s of sleep polled every 0.05 s
    count = len(here)
    time.sleep(0.2)
    assert len(here) == count  # and none after the jobs
    with pytest.raises(ValueError, match="sleep length must be non-negative"):
        run_jobs([(functools.partial(time.sleep, -1), {}), (functools.partial(time.sleep, 1.0), {})], workers=2,
                 progress=lambda: None, poll_seconds=0.05)


NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def _pids(directory) -> list[int]:
    return [int(path.stem) for path in Path(directory).glob("*.pid")]


@NEEDS_PROC
def test_a_failing_job_ends_the_running_ones_at_once(tmp_path):
    """The failure surfaces at once, whichever job it is (here the second, with no progress polling), and the
    worker still training is ended rather than waited for: before, the error came after the other job's end."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match="this job failed"):
        run_jobs([(_parallel_jobs.sleep_reporting_pid, dict(directory=str(tmp_path), seconds=300)),
                  (_parallel_jobs.fail_once_another_started, dict(directory=str(tmp_path)))], workers=2)
    assert time.perf_counter() - start < 120  # the sleeping job alone would take 300 s
    (pid,) = _pids(tmp_path)
    assert not process_running(pid)


@NEEDS_PROC
def test_a_killed_worker_is_reported_at_once_and_ends_the_others(tmp_path):
    """A worker killed (the out-of-memory killer's SIGKILL) broke the pool, and the parent then hung for ever
    telling the workers to stop: a multiprocessing.Event waits for each sleeping worker, the dead one too, to
    acknowledge. It now fails at once, saying a worker died, and the other job's worker ends. In a child process,
    so that a hang fails the test rather than the test run."""
    jobs = (f"[(_parallel_jobs.sleep_reporting_pid, dict(directory={str(tmp_path)!r}, seconds=300)), "
            f"(_parallel_jobs.die_once_another_started, dict(directory={str(tmp_path)!r}))]")
    script = ("import _parallel_jobs\nfrom kpro.demo.parallel import run_jobs\nif __name__ == '__main__':\n"
              f"    run_jobs({jobs}, 2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, text=True, stderr=subprocess.PIPE)
    try:
        _, err = parent.communicate(timeout=120)  # the sleeping job alone would take 300 s
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert parent.returncode not in (0, None) and "BrokenProcessPool" in err, err
    assert "a worker process of the demo died" in err, err
    assert "__name__" not in err, err  # `python -c`: the workers import no script, so no advice about one
    deadline = time.monotonic() + 30
    while any(process_running(pid) for pid in _pids(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids(tmp_path) and not [pid for pid in _pids(tmp_path) if process_running(pid)]


def test_a_killed_worker_is_one_error_line_on_the_command_line(tmp_path, capsys, monkeypatch):
    """The command line passed BrokenProcessPool (a RuntimeError) on as a 34-line chained traceback, where every
    other error of `python -m kpro demo` is one `error: ...` line."""
    from concurrent.futures.process import BrokenProcessPool

    import kpro.demo
    from kpro.cli import main

    def killed(out_dir, seed=0):
        raise BrokenProcessPool("a worker process of the demo died (killed, ...)")
    monkeypatch.setitem(kpro.demo.ACTS, "basics", killed)
    assert main(["demo", "basics", "--out", str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err == "error: a worker process of the demo died (killed, ...)\n"


def test_a_script_without_a_main_guard_is_told_why_its_workers_died(tmp_path):
    """A script calling an act at its top level: each spawned worker runs the script again and dies starting, and
    the error said only that a worker was killed, most often for lack of memory. It now gives the advice too."""
    jobs = f"[(_parallel_jobs.sleep_reporting_pid, dict(directory={str(tmp_path)!r}, seconds=1))] * 2"
    script = tmp_path / "my_demo.py"
    script.write_text(f"import _parallel_jobs\nfrom kpro.demo.parallel import run_jobs\nrun_jobs({jobs}, 2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    run = subprocess.run([sys.executable, str(script)], env=env, text=True, capture_output=True, timeout=120)
    assert run.returncode != 0 and "a worker process of the demo died" in run.stderr, run.stderr
    assert 'under `if __name__ == "__main__":`, or set KPRO_DEMO_WORKERS=1' in run.stderr, run.stderr
    assert not _pids(tmp_path)  # no job started


@NEEDS_PROC
def test_workers_end_when_their_parent_is_killed(tmp_path):
    """A demo killed by a signal it cannot handle leaves no worker training on: each notices its parent is gone."""
    job = f"(_parallel_jobs.sleep_reporting_pid, dict(directory={str(tmp_path)!r}, seconds=300))"
    script = ("import _parallel_jobs\nfrom kpro.demo.parallel import run_jobs\nif __name__ == '__main__':\n"
              f"    run_jobs([{job}] * 2, 2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(_pids(tmp_path)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the two workers never started their jobs"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while any(process_running(pid) for pid in _pids(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in _pids(tmp_path) if process_running(pid)]


@NEEDS_PROC
@pytest.mark.parametrize("how", ["ctrl-c-to-the-demo-alone", "ctrl-c-from-a-terminal", "sigterm-to-the-demo"])
def test_ctrl_c_lets_each_worker_save_its_training(tmp_path, how):
    """Ctrl-C during a parallel act ended the workers before fit could save, so a rerun started the act over. Each
    training job now stops after its step with a checkpoint, whether the signal reached the demo alone or, as a
    terminal's does, every process of its group (then each worker gets it twice, counted once). A third job,
    queued, must not start training after Ctrl-C (the pool had handed it over, and it trained to its end).
    SIGTERM, a scheduler's notice, ended the demo at once and its workers with it, unsaved: now as Ctrl-C, and each
    job's line names it (the workers get it as SIGINT: their lines said "Ctrl-C")."""
    jobs = f"[(_parallel_jobs.train_until_interrupted, dict(directory={str(tmp_path)!r}, name=n)) for n in 'abc']"
    # Python's own Ctrl-C handling, as at a terminal: a pytest-xdist worker ignores SIGINT, and children inherit it
    script = ("import signal, _parallel_jobs\nfrom kpro.demo.parallel import run_jobs\nif __name__ == '__main__':\n"
              f"    signal.signal(signal.SIGINT, signal.default_int_handler)\n    run_jobs({jobs}, 2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True, text=True,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(_pids(tmp_path)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the two jobs never started training"
            time.sleep(0.1)
        if how == "ctrl-c-from-a-terminal":
            os.killpg(parent.pid, signal.SIGINT)
        else:
            parent.send_signal(signal.SIGTERM if how == "sigterm-to-the-demo" else signal.SIGINT)
        _, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    # each training job said its stop: run_jobs says the stop was said (a command adds no bare "interrupted")
    assert parent.returncode != 0 and err.rstrip().endswith("kpro.errors.StoppedAndSaid"), err
    assert err.count("run again to resume") == 2, err
    said = "SIGTERM: stopping after this step with a checkpoint (press Ctrl-C to quit" if how == "sigterm-to-the-demo" \
        else "Ctrl-C: stopping after this step with a checkpoint (press Ctrl-C again to quit"
    assert err.count(said) == 2 and err.count(": stopping after this step") == 2, err
    for name in "ab":
        assert len(list((tmp_path / name).glob("step-*"))) == 1, err
    assert not (tmp_path / "c").exists(), err
    assert not [pid for pid in _pids(tmp_path) if process_running(pid)]


def test_workers_leave_a_group_sigterm_to_the_demo():
    """A scheduler's SIGTERM reaches every process of the job: a worker outside fit died of it, and the demo could
    say a worker had died (most often of lack of memory) rather than stop as on Ctrl-C. Workers now ignore it (the
    demo passes Ctrl-C on to them)."""
    dispositions = run_jobs([(_parallel_jobs.signal_dispositions, {})] * 2, workers=2)
    assert [sigterm for _, sigterm in dispositions] == ["SIG_IGN"] * 2, dispositions


def test_internalization_progress_follows_the_runs_metrics_files(tmp_path):
    def log(run, steps, partial=False):
        path = tmp_path / run / "run" / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as file:
            file.writelines(json.dumps({"step": s, "loss": 1.0, "padding": "x" * 100}) + "\n" for s in steps)
            file.write('{"step": 999, "lo' if partial else "")  # a line still being written
        return path

    assert last_logged_step(tmp_path / "none" / "metrics.jsonl") == 0
    assert last_logged_step(log("partial-only", [], partial=True)) == 0
    log("explicit-cot", range(1, 4))
    log("no-cot", range(1, 101))  # more than the 4 KiB read from the end
    out = io.StringIO()  # not a terminal: a line per LOG_LINE_SECONDS
    progress = RunsProgress(internalization.training_groups(tmp_path, chain_steps=10, no_cot_steps=200), stream=out)
    assert progress.steps() == (3, 100)  # what a resumed run had done before this session
    log("internalized", range(1, 5), partial=True)
    log("no-cot", range(101, 151))
    progress.report()
    progress.report()  # within the minute: no second line in a log
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "  training: explicit CoT then internalization 7/10 steps, no CoT 150/200; 0:00 elapsed, about 0:00 left")


def test_a_progress_line_over_finished_and_unstarted_runs(tmp_path):
    """A group whose runs had all finished before this session (a resumed act) read as infinitely far from done,
    so the line said so for the whole act; a session with no step yet says it cannot estimate."""
    done = tmp_path / "done.jsonl"
    done.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 11)))
    waiting = tmp_path / "waiting.jsonl"
    out = io.StringIO()
    progress = RunsProgress({"a": ([done], 10), "b": ([waiting], 20)}, stream=out)
    progress.report()
    waiting.write_text(json.dumps({"step": 5}) + "\n")
    progress.logged = None  # as a minute later
    progress.report()
    progress.close()
    first, second = out.getvalue().splitlines()
    assert first.startswith("  training: a 10/10 steps, b 0/20; 0:00 elapsed, time left not known yet")
    assert second.startswith("  training: a 10/10 steps, b 5/20; 0:00 elapsed, about 0:00 left")
    # groups taking turns on one worker: the second not started yet, the first's pace stands for both
    progress = RunsProgress({"a": ([waiting], 20), "b": ([tmp_path / "later.jsonl"], 30)}, stream=io.StringIO())
    progress.first = (0, 0)
    assert progress.left(10.0, (5, 0), [20, 30]) == 10.0 * 45 / 5
    assert progress.left(10.0, (5, 3), [20, 30]) == max(10.0 * 15 / 5, 10.0 * 27 / 3)
    # taking turns (one worker), the second group started: the pace of all steps done, not the second's over
    # a time that holds the first's turn (an estimate of 22 days for 30 minutes left)
    turns = RunsProgress({"a": ([waiting], 10500), "b": ([tmp_path / "later.jsonl"], 10500)}, stream=io.StringIO(),
                         side_by_side=False)
    turns.first = (0, 0)
    assert turns.left(1802.0, (10500, 10), [10500, 10500]) == 1802.0 * 10490 / 10510


def test_a_progress_line_over_runs_that_drop_their_last_sessions_lines(tmp_path):
    """A run killed before its first checkpoint starts over and truncates its metrics: its steps stayed behind
    those read at the start, and the 3x3 reproduction said "time left not known yet" for 46 minutes."""
    stale = tmp_path / "metrics.jsonl"
    stale.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 301)))
    out = io.StringIO()
    progress = RunsProgress({"a": ([stale], 400)}, stream=out)
    stale.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 11)))  # fit started over
    progress.report()
    stale.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 111)))
    progress.logged = None
    progress.report()
    progress.close()
    assert progress.first == (10,)
    assert out.getvalue().splitlines()[1].startswith("  training: a 110/400 steps; 0:00 elapsed, about 0:00 left")


def test_the_last_logged_step_is_found_behind_records_longer_than_the_window(tmp_path):
    """The last 4 KiB of a file whose records are longer held no whole line, and the step read as 0."""
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as file:
        file.writelines(json.dumps({"step": s, "per_token": [0.123456789] * 700}) + "\n" for s in range(1, 6))
        file.write('{"step": 6, "per_token": [' + "0.5, " * 2000)  # a long line still being written
    assert path.stat().st_size > 5 * 8192 and last_logged_step(path) == 5


def test_reproductions_are_registered_with_their_duration():
    from kpro.demo import REPRODUCTIONS
    for name in ("internalization-seeds", "internalization-3x3", "bitune-seeds", "bitune-readings", "expansion-seeds"):
        entry = REPRODUCTIONS[name]
        assert "minute" in entry.duration or "hour" in entry.duration, (name, entry.duration)
    assert bitune.FULL == {"tune_steps": 600, "held_out": 1000}


def test_the_demo_ends_with_each_acts_time_and_verdict(tmp_path, monkeypatch, capsys):
    import kpro.demo as demo_package
    monkeypatch.setattr(demo_package, "ACTS", {"a": lambda out, seed: {"claim_shown": True},
                                               "b": lambda out, seed: {"claim_shown": False},
                                               "c": lambda out, seed: {"skipped": "not installed"}})
    demo_package.run(["a", "b", "c"], tmp_path)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("demo done in ") and "a 0.0 min, claim SHOWN; b 0.0 min, claim NOT SHOWN; " \
        "c 0.0 min, claim not made (skipped)" in last


@pytest.mark.parametrize("reproduction", ["reproduce_bitune_seeds", "reproduce_internalization_seeds"])
def test_seeds_past_the_largest_batches_takes_are_refused_by_the_first_seed(reproduction, tmp_path):
    """`reproduce NAME --seed 2**63 - 2` was refused as `seed ... got 9223372036854775808`, a seed the user never
    gave; the first seed and the one to start from below are named now, before any work. The largest is
    Batches' 2**61 - 2: 2**61 - 1 would shuffle as seed 0."""
    with pytest.raises(ValueError, match=rf"{reproduction}: seeds {2 ** 61 - 3} to {2 ** 61 - 1} pass 2\*\*61 - 2, the "
                                         rf"largest seed Batches takes: start at {2 ** 61 - 4} or below"):
        getattr(seeds, reproduction)(tmp_path / "out", seed=2 ** 61 - 3, seeds=3)
    assert not (tmp_path / "out").exists()


def test_the_expansion_claim_fails_when_one_seed_does_not_keep_the_general_task():
    """The verdict was tested on one seed, or on seeds that all kept the general task: a claim shown where any
    seed kept it, not every one, passed."""
    run = lambda expanded, control: {"expanded": {"general": expanded, "domain": 1.0},
                                     "control": {"general": control, "domain": 1.0}}
    assert expansion.verdict([run(0.9, 0.1)])[0] is True
    shown, margin = expansion.verdict([run(0.9, 0.1), run(0.7, 0.1)])  # margins 0.8 and 0.6, but 0.7 < KEPT
    assert expansion.KEPT > 0.7 and shown is False and margin == pytest.approx(0.6)


def test_expansion_curves_reports_its_progress_from_the_runs_metrics(tmp_path, monkeypatch):
    """`reproduce expansion-curves` printed nothing for its minutes of training (the act it shares its runs with
    prints a progress line): its groups now name the metrics files its runs write, and count their steps."""
    from kpro.demo import expansion_curves
    from kpro.demo.expansion import ARMS
    from kpro.train.progress import last_logged_step
    seen, real = [], expansion_curves.run_jobs_reporting

    def spy(jobs, workers, groups):
        seen.append(groups)
        return real(jobs, workers, groups)
    monkeypatch.setattr(expansion_curves, "run_jobs_reporting", spy)
    expansion_curves.reproduce_expansion_curves(tmp_path, seeds=(0,), every=2, pretrain_steps=4, domain_steps=4,
                                                eval_examples=4, workers=1)
    assert [list(groups) for groups in seen] == [["pretraining"], list(ARMS)]
    for groups in seen:
        for paths, total in groups.values():
            assert paths and sum(last_logged_step(path) for path in paths) == total


def test_a_clean_split_of_unequal_sides_is_fishers_exact_chance():
    """The clean split's chance, and its printed odds, for sides of unequal sizes (the acts' are equal, where
    C(2n, n) would pass too), against the arrangements counted one by one."""
    for n_a, n_b in ((3, 5), (5, 3), (5, 8), (1, 4), (6, 2)):
        arrangements = sum(1 for _ in itertools.combinations(range(n_a + n_b), n_a))
        assert claims.clean_split(n_a, n_b) == pytest.approx(1 / arrangements, rel=1e-12), (n_a, n_b)
    assert claims.exceeds_standard_errors(1.0, 0.0, (5, 8))  # 1 in 1,287 < 1 in 741
    assert not claims.exceeds_standard_errors(1.0, 0.0, (5, 6))  # 1 in 462
    assert "a chance of 1 in 1,287 (3 standard errors: 1 in 741)" in claims.in_standard_errors(
        1.0, 0.0, 3, questions=(5, 8))


def test_run_jobs_returns_results_in_the_order_of_the_jobs_not_of_their_ends():
    """P01 (demo/parallel.py `[future.result() for future in futures]` -> `... in done`): the existing parallel
    test's two jobs return equal scores, so any order passed. Here the first jobs end last."""
    from _parallel_jobs import value_after

    from kpro.demo.parallel import run_jobs
    jobs = [(value_after, dict(value=i, seconds=0.4 * (5 - i))) for i in range(6)]
    assert run_jobs(jobs, workers=2) == list(range(6))


def test_two_cores_run_two_workers_by_default(monkeypatch):
    """P02 (demo/parallel.py `>= 2` -> `> 2`): the documented rule (two on a machine with two or more cores) was
    tested only through KPRO_DEMO_WORKERS."""
    from kpro.demo import parallel
    monkeypatch.delenv("KPRO_DEMO_WORKERS", raising=False)
    for cores, workers in ((None, 1), (1, 1), (2, 2), (64, 2)):
        monkeypatch.setattr(parallel.os, "cpu_count", lambda cores=cores: cores)
        assert parallel.default_workers() == workers, cores


def test_the_seeds_figures_are_named_by_their_own_seed():
    """S01 (demo/seeds.py `first_seed + i` -> `i`): a reproduction from --seed 5 named its gains 'on seed 0, 1';
    the test of the names ran from seed 0 only."""
    from kpro.demo import seeds
    assert list(seeds.seeds_inputs([0.1, 0.2], {"bitune": 0.9, "only_causal": 0.8}, first_seed=5)) == [
        "gain on seed 5", "gain on seed 6", "bitune's mean accuracy on right", "only_causal's mean accuracy on right"]


def test_the_internalization_reproduction_is_shown_only_when_every_seed_shows_it(tmp_path, monkeypatch, capsys):
    """S02 (demo/seeds.py `all(...)` -> `any(...)`): no test ran reproduce_internalization_seeds past its argument
    checks; its claim must hold on every seed, as its 'claim shown on k of n seeds' line says."""
    from kpro.demo import seeds

    class Act:  # the act's results made up: the claim shown on seeds 0 and 2, not on seed 1
        check = staticmethod(lambda out_dir, seed, **act: None)

        def __call__(self, out_dir, seed, **act):
            row = {"accuracy": 0.5, "cot_tokens": 0.0}
            return {"explicit CoT": row, "no CoT": row, "internalized": row, "claim_shown": seed != 1}
    monkeypatch.setattr(seeds, "act_internalization", Act())
    result = seeds.reproduce_internalization_seeds(tmp_path, seeds=3)
    assert "claim shown on 2 of 3 seeds" in capsys.readouterr().out
    assert result["claim_shown"] is False
    monkeypatch.setattr(seeds, "act_internalization", type("All", (Act,), {"__call__": lambda self, out_dir, seed,
                                                                           **act: {**Act()(out_dir, 0),
                                                                                   "claim_shown": True}})())
    assert seeds.reproduce_internalization_seeds(tmp_path, seeds=3)["claim_shown"] is True


# Mutation round 11: ACT3 (demo/act_settings.py:114 `seed + seeds > MAX_SEED + 1` -> `>=`)
def test_seeds_ending_at_the_largest_seed_batches_takes_are_accepted():
    from kpro._numbers import MAX_SEED
    from kpro.demo.act_settings import check_positive

    check_positive("reproduce_bitune_seeds", seed=MAX_SEED - 2, seeds=3)  # seeds MAX_SEED - 2 .. MAX_SEED
    with pytest.raises(ValueError, match=rf"seeds {MAX_SEED - 1} to {MAX_SEED + 1} pass 2\*\*61 - 2"):
        check_positive("reproduce_bitune_seeds", seed=MAX_SEED - 1, seeds=3)


# Mutation round 11: ACT4 (demo/act_settings.py:109 `0 < value < math.inf` -> `0 < value`)
def test_an_infinite_learning_rate_is_refused_before_any_work(tmp_path):
    from kpro.demo import bitune as demo_bitune

    with pytest.raises(ValueError, match="act_bitune: lr must be a positive number, got inf"):
        demo_bitune.act_bitune.check(tmp_path / "out", lr=math.inf)  # the act's own check, which writes nothing
    assert not (tmp_path / "out").exists()


# Mutation round 11: SM1 (demo/smollm2.py:103 `split_files` returns every file for training)
def test_smollm2_holds_files_out_by_a_hash_of_their_name_and_never_trains_on_them():
    from kpro.demo.smollm2 import split_files

    files = [Path("lib") / f"module_{i}.py" for i in range(200)]
    train, held = split_files(files)
    assert held == [f for f in files if zlib.crc32(f.name.encode()) % 10 == 0] and held
    assert not set(train) & set(held) and sorted(train + held) == sorted(files)


# Mutation round 11: SM2 (demo/smollm2.py:145 `model.train(was_training)` -> `model.train()`)
def test_smollm2_mean_loss_is_the_token_mean_and_leaves_the_models_mode_as_it_was():
    from kpro.demo.smollm2 import mean_loss
    from kpro.train import collate_packed, lm_loss

    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    rows = torch.randint(3, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = float(lm_loss(model.eval(), collate_packed(rows)).mean)  # one batch of every row
    for training in (True, False):
        model.train(training)
        assert mean_loss(model, rows, batch_size=2) == pytest.approx(reference, rel=1e-5)
        assert model.training is training


# Mutation round 11: SM3 (demo/smollm2.py:153 `max(1, steps // 10)` -> `max(1, steps // 100)`; equal below 20 steps,
# so near-equivalent at the act's 16)
def test_smollm2_train_steps_warm_up_linearly_over_a_tenth_of_the_steps(monkeypatch):
    from kpro.demo import smollm2

    seen, real = [], smollm2.adamw

    def recording(model, lr, **kwargs):
        optimizer = real(model, lr, **kwargs)
        step = optimizer.step

        def stepped(*args, **kw):
            seen.append(optimizer.param_groups[0]["lr"])
            return step(*args, **kw)
        optimizer.step = stepped
        return optimizer
    monkeypatch.setattr(smollm2, "adamw", recording)
    torch.manual_seed(0)
    rows = torch.randint(3, 60, (4, 10), generator=torch.Generator().manual_seed(0))
    smollm2.train_steps(kpro.Llama(tiny_config()), rows, steps=20, batch_size=2, lr=1e-3)
    assert seen[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and len(seen) == 20


# Mutation round 12
def test_basics_draws_skip_held_out_prompts():
    """a held-out prompt drawn again is skipped, by its prompt (the answer in held_out may be anything)."""
    from kpro.demo.basics import drawn_outside
    draws = iter([("ab>", "ba"), ("cd>", "dc"), ("ab>", "ba"), ("ef>", "fe")])
    pairs = drawn_outside(lambda: next(draws), 2, held_out=[("ab>", "unused")])
    assert pairs == [("cd>", "dc"), ("ef>", "fe")]


# Mutation round 12
def test_basics_checkpoints_hold_the_tokenizer(tmp_path):
    """every training checkpoint of the basics act holds the tokenizer (TokenizerInCheckpoints), so that
    `python -m kpro generate` runs on it."""
    from kpro.demo import basics
    basics.act_basics(tmp_path / "b", steps=1)
    [checkpoint] = kpro.train.list_checkpoints(basics.run_directory(tmp_path / "b"))
    assert kpro.load_tokenizer(checkpoint).encode("ab>") == kpro.load_tokenizer(tmp_path / "b").encode("ab>")


# Mutation round 12
def test_basics_training_answers_end_with_eos():
    """(`<bos> prompt`, `answer <eos>`): the model learns to stop, as `answers` decodes up to eos."""
    from kpro.demo.basics import LETTERS, reversal_task, training_examples
    tok = kpro.CharTokenizer(LETTERS + ">")
    pairs = training_examples(tok, random.Random(0), 5)
    reference = [reversal_task(r) for r in [random.Random(0)] for _ in range(5)]
    assert [(p, a) for p, a in pairs] == [([tok.bos_id] + tok.encode(p, bos=False, eos=False), tok.encode(a, bos=False, eos=False) + [tok.eos_id])
                                         for p, a in reference]


def test_check_positive_takes_the_largest_seed():
    """Guards: `0 <= value <= MAX_SEED` -> `< MAX_SEED`: the largest seed the message itself names (2**61 - 2)
    was refused."""
    from kpro.demo.act_settings import check_positive
    check_positive("act", seed=2**61 - 2)
    check_positive("act", seed=2**61 - 2, seeds=1)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 2\\*\\*61 - 2"):
        check_positive("act", seed=2**61 - 1)


def test_a_skipped_act_records_no_settings(tmp_path):
    """Guards: the unlink after a `{"skipped": ...}` result dropped: an act that ran nothing kept its settings, so
    the rerun with other ones (once the model is installed) was refused."""
    from kpro.demo.act_settings import SETTINGS_FILE, records_settings

    @records_settings()
    def act(out_dir, steps=1):
        return {"skipped": "the model is not installed"}

    assert act(tmp_path / "a", steps=1) == {"skipped": "the model is not installed"}
    assert not (tmp_path / "a" / SETTINGS_FILE).exists()
    act(tmp_path / "a", steps=2)  # other settings: not refused, nothing ran before


def test_progress_logs_a_line_a_minute_for_the_whole_act(tmp_path):
    """Guards: the cadence measured from the act's start instead of the last line: after the first minute every
    report (each poll) wrote a line to a log."""
    out = io.StringIO()
    progress = RunsProgress({"a": ([tmp_path / "m.jsonl"], 10)}, stream=out)
    progress.start = time.perf_counter() - 600  # ten minutes into the act
    for _ in range(3):
        progress.report()  # within one minute of each other
    progress.close()
    assert len(out.getvalue().splitlines()) == 1


def test_side_by_side_estimate_with_a_group_finished_before_this_session(tmp_path):
    """Guards: `r == 0 or` dropped from the side-by-side test: a group finished in an earlier session (0 steps
    this session) turned the estimate to the taking-turns formula, the sum of all steps left at the mean pace."""
    progress = RunsProgress({n: ([tmp_path / f"{n}.jsonl"], t) for n, t in [("a", 10), ("b", 20), ("c", 33)]},
                            stream=io.StringIO())
    progress.first = (10, 0, 0)
    # the slowest group at its own pace: c has 30 left at 3 steps per 10 s
    assert progress.left(10.0, (10, 5, 3), [10, 20, 33]) == max(0.0, 10.0 * 15 / 5, 10.0 * 30 / 3)


def test_as_many_workers_as_groups_train_side_by_side(monkeypatch):
    """Guards: `>= len(groups)` -> `>`: with one worker per group the line estimated as if the groups took turns."""
    from kpro.demo import progress as progress_mod
    seen = []

    class Spy(progress_mod.RunsProgress):
        def __init__(self, groups, stream=None, side_by_side=True):
            seen.append(side_by_side)
            super().__init__(groups, stream=io.StringIO(), side_by_side=side_by_side)

    monkeypatch.setattr(progress_mod, "RunsProgress", Spy)
    monkeypatch.setattr(progress_mod, "run_jobs", lambda jobs, workers, progress: [])
    groups = {"a": ([], 1), "b": ([], 1)}
    for workers in (1, 2, 3):
        progress_mod.run_jobs_reporting([], workers, groups)
    assert seen == [False, True, True]
