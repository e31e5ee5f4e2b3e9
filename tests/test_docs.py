"""README.md and docs/*.md as tests: the examples run, the commands parse, the links resolve.

Every Python block of a page is marked on the line just before its opening fence:

    <!-- runnable -->          executed: a page's runnable blocks in order, in one namespace, in a fresh
                               directory holding the fixtures below, on one CPU thread
    <!-- runnable, needs transformers -->
                               the same where the named optional modules import; else the page's
                               examples are skipped, naming the missing one (`pip install -e '.[test]'`
                               does not install them)
    <!-- not-run: reason -->   shown only (it needs a GPU, or a launch of several processes)

An unmarked Python block fails `test_every_python_block_is_marked`. In shell blocks (bash, sh, console),
every `python -m kpro ...` command must parse with kpro's own argument parser and every `pytest ...`
command may use only options pytest knows (its plugins and the repository's conftest.py included);
neither is run. Relative links must point to existing files (and headings, for `page.md#anchor`). The
tables of measured figures (docs/benchmarks.md's headline figures) may quote only figures that
benchmarks/RESULTS.md holds, each row naming a section of it.

Fixtures, tiny and built with kpro itself, so that examples read like real use:

    tiny-llama/          a random 4-block LLaMA in the Hugging Face layout (config.json,
                         model.safetensors) with a SentencePiece tokenizer.model (1,000 pieces)
    corpus.txt           plain-text documents separated by blank lines
    instructions.jsonl   {"instruction", "response"} lines
    questions.jsonl      {"question", "choices", "answer"} lines (multiple choice)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import kpro
from kpro.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_PAGES = ["model", "ops", "training", "huggingface", "expansion", "internalization", "bitune", "benchmarks",
             "testing"]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
RUNNABLE = re.compile(r"<!--\s*runnable(?:\s*,\s*needs\s+([\w.]+(?:\s*,\s*[\w.]+)*))?\s*-->")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # line number of the block's first code line
    lang: str
    code: str
    marker: str  # the line just before the opening fence, stripped

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line - 1}"

    @property
    def runnable(self) -> bool:
        return bool(RUNNABLE.fullmatch(self.marker))

    @property
    def needs(self) -> list[str]:
        """The optional modules a runnable block names (`<!-- runnable, needs transformers -->`)."""
        match = RUNNABLE.fullmatch(self.marker)
        return [name.strip() for name in match.group(1).split(",")] if match and match.group(1) else []

    @property
    def not_run_reason(self) -> str | None:
        match = NOT_RUN.fullmatch(self.marker)
        return match.group(1) if match else None


def read_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        marker = lines[i - 1].strip() if i > 0 else ""
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and set(lines[j].strip()) == {fence[0]}):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        blocks.append(Block(page, i + 2, lang.lower(), "\n".join(body) + "\n", marker))
        i = j + 1
    return blocks


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def runnable_blocks(page: Path) -> list[Block]:
    return [b for b in read_blocks(page) if b.lang in PYTHON and b.runnable]


RUNNABLE_PAGES = [page for page in PAGES if runnable_blocks(page)]
SHELL_PAGES = [page for page in PAGES if any(b.lang in SHELL for b in read_blocks(page))]


# ------------------------------------------------------------------------------------------- fixtures

CORPUS = """\
The capital of France is Paris. Paris is on the Seine, and its museums hold paintings from every age.

A model reads a sentence one token at a time. Each token sees the tokens before it, and the last one
predicts what comes next.

Rivers run to the sea. The Loire is the longest river of France; the Rhone runs south to the Mediterranean.

Numbers can be added in any order: 2 + 3 is 3 + 2, and both are 5. Multiplication works the same way.
"""

INSTRUCTIONS = [
    ("What is the capital of France?", "Paris."),
    ("Add 2 and 3.", "5"),
    ("Name a river of France.", "The Loire."),
    ("Which sea does the Rhone reach?", "The Mediterranean."),
    ("Is 2 + 3 the same as 3 + 2?", "Yes, both are 5."),
    ("What does a language model predict?", "The next token."),
    ("Where are the paintings?", "In the museums of Paris."),
    ("Multiply 2 by 3.", "6"),
]

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "answer": 0},
    {"question": "What is 2 + 3?", "choices": ["4", "5"], "answer": "5"},
    {"question": "Which river is the longest in France?", "choices": ["the Seine", "the Loire"], "answer": 1},
    {"question": "Where does the Rhone run?", "choices": ["north", "south"], "answer": "south"},
]


def build_fixtures(directory: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = kpro.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2)
        kpro.save_pretrained(kpro.Llama(cfg), directory / "tiny-llama")
    kpro.Tokenizer(ROOT / "tests" / "data" / "sentencepiece_test_model.model").save(directory / "tiny-llama")
    (directory / "corpus.txt").write_text(CORPUS)
    (directory / "instructions.jsonl").write_text(
        "".join(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in INSTRUCTIONS))
    (directory / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))


@pytest.fixture(scope="module")
def fixture_template(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("docs-fixtures")
    build_fixtures(directory)
    return directory


@pytest.fixture
def workdir(fixture_template, tmp_path, monkeypatch):
    """A fresh copy of the fixtures as the working directory, and one CPU thread: the examples' matmuls are
    tiny, and on a busy 2-core machine OpenMP threads waiting on each other make them ~50x slower."""
    directory = tmp_path / "work"
    shutil.copytree(fixture_template, directory)
    monkeypatch.chdir(directory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield directory
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- tests

def test_the_docs_pages_exist():
    missing = [name for name in DOC_PAGES if not (ROOT / "docs" / f"{name}.md").is_file()]
    assert not missing, f"docs pages missing: {missing}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [name for name in DOC_PAGES if f"](docs/{name}.md" not in readme]
    assert not unlinked, f"README.md does not link docs pages {unlinked}"


def test_every_python_block_is_marked():
    problems = []
    for page in PAGES:
        for block in read_blocks(page):
            marked = block.runnable or block.not_run_reason is not None
            if block.lang in PYTHON and not marked:
                problems.append(f"{block.where}: Python block without <!-- runnable --> or <!-- not-run: reason -->")
            elif block.lang in PYTHON and block.not_run_reason == "":
                problems.append(f"{block.where}: <!-- not-run: --> needs a reason")
            elif block.lang not in PYTHON and marked:
                problems.append(f"{block.where}: a {block.lang or 'plain'} block is marked, but only Python blocks run")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("marker, runnable, needs", [
    ("<!-- runnable -->", True, []),
    ("<!-- runnable, needs transformers -->", True, ["transformers"]),
    ("<!-- runnable, needs transformers, gguf -->", True, ["transformers", "gguf"]),
    ("<!-- runnable needs transformers -->", False, []),  # no comma: unmarked, which the test above fails
    ("<!-- runnable, needs -->", False, []),
])
def test_runnable_markers_name_their_optional_modules(marker, runnable, needs):
    block = Block(ROOT / "README.md", 2, "python", "pass", marker)
    assert (block.runnable, block.needs) == (runnable, needs)


def test_there_are_runnable_blocks():
    """A docs test with nothing to run would pass whatever the pages say."""
    assert sum(len(runnable_blocks(page)) for page in PAGES) >= 10
    assert runnable_blocks(ROOT / "README.md"), "the README's API tour must run"


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=page_id)
def test_examples_run(page, workdir):
    """The page's runnable blocks, in order, in one namespace; tracebacks name the page and its line."""
    for module in dict.fromkeys(name for block in runnable_blocks(page) for name in block.needs):
        pytest.importorskip(module, reason=f"{page_id(page)}'s examples need {module}, an optional dependency")
    namespace = {"__name__": f"docs.{page.stem}"}
    with torch.random.fork_rng(devices=[]):  # examples that seed torch leave other tests' randomness alone
        for block in runnable_blocks(page):
            # Padded so that the code's line numbers are the page's.
            exec(compile("\n" * (block.line - 1) + block.code, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", SHELL_PAGES, ids=page_id)
def test_commands_parse(page):
    problems = []
    for block in read_blocks(page):
        if block.lang not in SHELL:
            continue
        for line, command in shell_commands(block):
            for words in simple_commands(command):
                problem = check_command(words)
                if problem:
                    problems.append(f"{page_id(page)}:{line}: {shlex.join(words)}\n    {problem}")
    assert not problems, "\n".join(problems)


def test_links_resolve():
    problems = []
    for page in PAGES:
        text = strip_code(page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                problems.append(f"{page_id(page)}: ({target}): no file {linked}")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                problems.append(f"{page_id(page)}: ({target}): no heading #{anchor} in {page_id(linked)}")
    assert not problems, "\n".join(problems)



DOTTED_NAME = re.compile(r"(?<![\w/.])((?:kpro|kt|ops|lora)(?:\.[A-Za-z_]\w*)+)")
ALIASES = {"kt": "kpro.train", "ops": "kpro.ops", "lora": "kpro.lora"}  # as the pages import them


def unresolved(name: str) -> str | None:
    """Why `name` (kpro.x.y, kt.x, ops.x, lora.x) fails when typed as written, or None (also where its module
    needs an optional dependency missing here). An attribute is taken first, as Python does:
    `kpro.ops.bitune_attention` is the function, which hides its module."""
    head, *parts = name.split(".")
    path = ALIASES.get(head, head)
    try:
        obj = importlib.import_module(path)
        for part in parts:
            path += "." + part
            if hasattr(obj, part):
                obj = getattr(obj, part)
                continue
            try:
                obj = importlib.import_module(path)
            except ImportError as err:
                if _optional_missing(err):
                    raise
                return f"{path.rsplit('.', 1)[0]} has no {part}"
    except ImportError as err:
        if not _optional_missing(err):
            raise
        # kpro.integrations.hf.* without transformers: this name is checked where it is installed (CI), the rest here
    return None


def _optional_missing(err: ImportError) -> bool:
    """Whether `err` is an optional dependency of a kpro module missing here (transformers, gguf)."""
    return isinstance(err, ModuleNotFoundError) and bool(err.name) and err.name.split(".")[0] != "kpro"


def test_the_dotted_names_in_the_docs_resolve_as_typed():
    """`kpro.ops.bitune_attention.mix_kv` in the prose raised AttributeError: the op shadows its module."""
    problems = []
    for page in PAGES:
        for line, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for name in DOTTED_NAME.findall(text):
                if name.rsplit(".", 1)[-1] in ("py", "md", "json", "safetensors", "so"):
                    continue  # a file name
                why = unresolved(name)
                if why:
                    problems.append(f"{page_id(page)}:{line}: {name}: {why}")
    assert not problems, "\n".join(problems)


def test_the_ops_table_gives_the_signatures_of_the_ops():
    """docs/ops.md's table of entry points read as `def` lines: the same parameters as the functions, each
    positional or keyword-only as there, with the same defaults (it showed linear_cross_entropy's
    keyword-only ignore_index and reduction as positional ones, which raise a TypeError)."""
    import ast
    import inspect

    from kpro import ops

    table = [line for line in (ROOT / "docs" / "ops.md").read_text(encoding="utf-8").splitlines()
             if line.startswith("| ") and line.endswith(" |")]
    shown = [call for line in table for call in re.findall(r"`(\w+\(.*?\))`", line.split(" | ")[1])]
    assert len(shown) >= 6, f"docs/ops.md's table of entry points was not found: {shown}"
    problems = []
    for call in shown:
        args = ast.parse(f"def {call}: pass").body[0].args
        documented = [(a.arg, "positional") for a in args.args] + [(a.arg, "keyword-only") for a in args.kwonlyargs]
        defaults = dict(zip([a.arg for a in args.args][len(args.args) - len(args.defaults):],
                            map(ast.literal_eval, args.defaults)))
        defaults.update({a.arg: ast.literal_eval(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d})
        parameters = inspect.signature(getattr(ops, call.split("(")[0])).parameters.values()
        actual = [(p.name, "keyword-only" if p.kind is p.KEYWORD_ONLY else "positional") for p in parameters]
        actual_defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
        if documented != actual or defaults != actual_defaults:
            problems.append(f"docs/ops.md shows {call}; the function is {call.split('(')[0]}"
                            f"{inspect.signature(getattr(ops, call.split('(')[0]))}")
    assert not problems, "\n".join(problems)


def _public_callables() -> dict:
    """kpro's public functions and classes (and their public methods) by the names docs call them: `name` and
    `Class.method`; a name two different objects share is left out (a page's `name(...)` would be ambiguous)."""
    import importlib.util
    import inspect

    import kpro.bitune
    import kpro.convert
    import kpro.expansion
    import kpro.internalize
    import kpro.lora
    import kpro.ops
    import kpro.train
    modules = [kpro, kpro.train, kpro.ops, kpro.lora, kpro.internalize, kpro.bitune, kpro.expansion, kpro.convert]
    if importlib.util.find_spec("transformers") is not None:  # an optional module (the GPU machine has none)
        import kpro.integrations.hf
        modules.append(kpro.integrations.hf)
    found: dict = {}
    for module in modules:
        for name in getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]):
            thing = getattr(module, name, None)
            if not callable(thing) or not (getattr(thing, "__module__", "") or "").startswith("kpro"):
                continue
            found.setdefault(name, set()).add(thing)
            if inspect.isclass(thing):
                for attr, method in vars(thing).items():
                    method = getattr(thing, attr) if isinstance(method, (classmethod, staticmethod)) else method
                    if not attr.startswith("_") and callable(method):
                        found.setdefault(f"{name}.{attr}", set()).add(method)
    return {name: things.pop() for name, things in found.items() if len(things) == 1}


def test_signatures_the_docs_show_make_keyword_only_parameters_keyword_only():
    """A page's `name(a, b, c=default)` stating the defaults of a kpro function is read as its signature: a parameter
    shown before any `*` with its default must not be keyword-only (docs/model.md showed `save_pretrained(model,
    dir, max_shard_size="5GB")`, and `save_pretrained(model, "out", "200KB")` raises a TypeError), and one shown
    after `*` must exist. Calls (`fit(model, batches, steps=10)`) give values that are not the defaults: skipped."""
    import ast
    import inspect

    callables, checked, problems = _public_callables(), [], []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for dotted, arguments in re.findall(r"`([\w.]+)(\((?:[^`()]|\([^`()]*\))*\))`",
                                            text.replace("\n  ", " ").replace("\n", " ")):
            parts = dotted.split(".")  # kt.TokenShards, kpro.LlamaConfig.from_hf: the last two names, or the last
            name = next((n for n in (".".join(parts[-2:]), parts[-1]) if n in callables), None)
            if name is None:
                continue
            shown = name + arguments
            try:
                args = ast.parse(f"def f{shown[len(name):]}: pass").body[0].args
                defaults = [ast.literal_eval(d) for d in args.defaults]
                kw_defaults = {a.arg: ast.literal_eval(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d}
            except (SyntaxError, ValueError):
                continue  # a call with values or expressions, not a signature
            try:
                signature = inspect.signature(callables[name])
            except (TypeError, ValueError):
                continue
            parameters = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
            by_name = {p.name: p for p in parameters}
            stated = dict(zip([a.arg for a in args.args][len(args.args) - len(defaults):], defaults)) | kw_defaults
            if not stated or any(key not in by_name or by_name[key].default != value for key, value in stated.items()):
                continue  # no defaults stated, or values that are not the function's defaults: a call
            checked.append(shown)
            for index, arg in enumerate(args.args):
                actual = by_name.get(arg.arg) or (parameters[index] if index < len(parameters) else None)
                if actual is None or actual.kind not in (actual.POSITIONAL_ONLY, actual.POSITIONAL_OR_KEYWORD):
                    problems.append(f"{page.relative_to(ROOT)} shows `{shown}`, but {arg.arg} is keyword-only or "
                                    f"absent: {name}{signature}")
                    break
            for arg in args.kwonlyargs:
                if arg.arg not in by_name:
                    problems.append(f"{page.relative_to(ROOT)} shows `{shown}`, but {name} has no {arg.arg}")
    assert len(checked) >= 10, f"too few signatures found in the docs to check: {checked}"
    assert not problems, "\n".join(problems)


def test_measured_figures_are_those_of_results():
    """Each row of a measured table (docs/benchmarks.md's headline figures, and any page's) names a section of
    RESULTS.md, and every number it quotes appears, whole, in that section (its text up to the next section of
    its level): figures are copied, never made up. ("9,37" inside "9,372", or a figure of another section, passed
    when any substring of the whole file did.)"""
    results = RESULTS.read_text(encoding="utf-8")
    sections = results_sections(results)
    assert len(measured_table(ROOT / "docs" / "benchmarks.md")) >= 5, (
        "docs/benchmarks.md's measured table is missing (a '| what | figures | RESULTS.md section |' table)")
    rows = [row for page in PAGES for row in measured_table(page)]
    problems = []
    for what, figures, section in rows:
        section = section.strip("`*\" ")
        texts = [text for title, text in sections.items() if title.startswith(section)]
        if not texts:
            problems.append(f"{what}: RESULTS.md has no section '{section}'")
            continue
        for number in re.findall(r"\d+(?:[.,]\d+)*", figures):
            if not any(holds_number(text, number) for text in texts):
                problems.append(f"{what}: {number} does not appear in RESULTS.md's section '{section}'")
    assert not problems, "\n".join(problems)


def results_sections(results: str) -> dict[str, str]:
    """RESULTS.md's `## ` sections by title, each with its text up to the next `## ` heading."""
    parts = re.split(r"^## (.+)$", results, flags=re.M)
    return {title.strip(): text for title, text in zip(parts[1::2], parts[2::2])}


def holds_number(text: str, number: str) -> bool:
    """Whether `text` holds `number` whole: not inside a longer one ("9,37" of "9,372", "72" of "1.72")."""
    return re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d]|[.,]\d)", text) is not None


def test_the_figures_guard_takes_numbers_whole_and_from_the_named_section():
    """The guard above: a number is found only whole, and only in its row's section."""
    sections = results_sections("# R\n## A one\nfit 9,372 tokens/s, 1.5 ms.\n### sub\n12 KiB\n## B two\n3,802\n")
    assert set(sections) == {"A one", "B two"} and "12 KiB" in sections["A one"]
    one, two = sections["A one"], sections["B two"]
    assert holds_number(one, "9,372") and holds_number(one, "1.5") and holds_number(one, "12")
    assert not holds_number(one, "9,37") and not holds_number(one, "372") and not holds_number(one, "1")
    assert not holds_number(one, "3,802") and holds_number(two, "3,802")


# ---------------------------------------------------------------------------------------------- helpers

def shell_commands(block: Block):
    """(line number, command) for each command of a shell block: continuation lines joined, console
    prompts (`$ `) stripped and console output left out, comment lines skipped."""
    pending, start = "", None
    for offset, raw in enumerate(block.code.splitlines()):
        line = raw.rstrip()
        if block.lang == "console" and not pending:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = block.line + offset if not pending else start
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def simple_commands(command: str) -> list[list[str]]:
    """The words of each simple command of a line (split at &&, ||, ;, |), comments dropped, leading
    environment assignments (`OMP_NUM_THREADS=1 pytest ...`) dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    cleaned = []
    for words in commands:
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def check_command(words: list[str]) -> str | None:
    """Why a documented command is wrong (None if it is right, or not one we check)."""
    if words[:3] in (["python", "-m", "kpro"], ["python3", "-m", "kpro"]) or words[:1] == ["kpro"]:
        args = words[1:] if words[0] == "kpro" else words[3:]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                exact_parser().parse_args(args)
        except SystemExit as exit:
            if exit.code:
                return "kpro's parser refuses it: " + " ".join(stderr.getvalue().split())
        return None
    if words[:1] == ["pytest"] or words[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]):
        args = words[1:] if words[0] == "pytest" else words[3:]
        unknown = [arg for arg in args if arg.startswith("-") and not known_pytest_option(arg)]
        return f"pytest has no option(s) {', '.join(unknown)}" if unknown else None
    return None


def exact_parser() -> argparse.ArgumentParser:
    """kpro's parser, refusing abbreviated options (`--recompute` for `--recompute-frozen`): a page must spell
    out the option a reader will find in `--help`."""
    parser = build_parser()
    subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for sub in [parser, *(p for action in subcommands for p in action.choices.values())]:
        sub.allow_abbrev = False
    return parser


# pytest-xdist's, from the `test` extra: known where it is not installed too (the GPU machine has none).
XDIST_OPTIONS = frozenset({"-n", "--numprocesses", "--dist"})


def known_pytest_option(arg: str) -> bool:
    name = arg.split("=", 1)[0]
    if name in pytest_options() or name in XDIST_OPTIONS:
        return True
    # Short flags run together: -sq, -xvs.
    return bool(re.fullmatch(r"-[A-Za-z]{2,}", name)) and all(f"-{c}" in pytest_options() for c in name[1:])


@lru_cache(maxsize=1)
def pytest_options() -> frozenset[str]:
    """Every option `pytest --help` lists here: pytest's own, its plugins' (pytest-benchmark) and the
    repository conftest's (--benchmark)."""
    help_text = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))


def strip_code(text: str) -> str:
    """The page without its fenced code blocks (links inside code are not links)."""
    return re.sub(r"^(\s*)(`{3,}|~{3,}).*?^\s*\2\s*$", "", text, flags=re.S | re.M)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a page: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in strip_code(page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-"))
    return anchors


def measured_table(page: Path) -> list[tuple[str, str, str]]:
    """(what, figures, section) rows of the table whose header ends in `RESULTS.md section`."""
    rows, inside = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            inside = False
        elif cells[-1].endswith("RESULTS.md section"):
            inside = True
        elif inside and not set("".join(cells)) <= set("-: "):
            rows.append((cells[0], " ".join(cells[1:-1]), cells[-1]))
    return rows


@pytest.mark.parametrize("name", ["kpro.internalize", "kpro.expansion"])
def test_all_lists_every_public_name_the_package_imports(name):
    """A name dropped from __all__ (lr_schedule, saved_activation_bytes): `from kpro.X import *` and
    test_docs' walk over __all__ (which checks documented signatures) silently lost it."""
    import importlib
    import types
    module = importlib.import_module(name)
    public = {n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert set(module.__all__) == public
