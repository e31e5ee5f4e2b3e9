"""The CUDA build path (compile-only where there is no GPU) and the command line."""
import ctypes
import importlib.metadata
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from kpro import _cuda_build
from kpro.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
nvcc = _cuda_build.find_nvcc()


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
def test_builder_compiles_a_c_entry_point_without_torch_headers(tmp_path):
    (tmp_path / "probe.cu").write_text(
        '#include <cuda_runtime.h>\n'
        '__global__ void twice(float* x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= 2; }\n'
        'extern "C" int kpro_probe(int a) { return a + 1; }\n')
    lib = _cuda_build.build_library(tmp_path, tmp_path / "out", verbose=False)
    assert ctypes.CDLL(str(lib)).kpro_probe(41) == 42  # host code runs without a GPU
    assert (tmp_path / "out" / (lib.name + ".digest")).read_text().strip() == _cuda_build.sources_digest(tmp_path)


def fatbin_entries(library: Path) -> set[tuple[str, int]]:
    """(kind, sm) of every image in the CUDA fat binaries embedded in a shared library: kind "sass" (an ELF
    cubin) or "ptx". Reads the fatbin container headers: magic 0xBA55ED50, then per image its kind
    (2-byte: 1 PTX, 2 ELF), header and padded payload sizes, and the target sm at byte 28."""
    data, images = library.read_bytes(), set()
    magic = struct.pack("<I", 0xBA55ED50)
    start = data.find(magic)
    while start != -1:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        entry, end = start + header_size, start + header_size + fat_size
        while entry < end:
            kind, _, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            images.add(({1: "ptx", 2: "sass"}.get(kind, str(kind)), struct.unpack_from("<I", data, entry + 28)[0]))
            entry += entry_header + padded
        start = data.find(magic, end)
    return images


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
def test_library_embeds_sass_for_ampere_and_hopper_and_ptx_for_newer_gpus(tmp_path):
    """Without PTX the library would fail to load on sm_100 and newer: the driver JIT-compiles compute_90 PTX."""
    (tmp_path / "probe.cu").write_text("__global__ void twice(float* x) { x[threadIdx.x] *= 2; }\n")
    images = fatbin_entries(_cuda_build.build_library(tmp_path, tmp_path / "out", verbose=False))
    assert images == {("sass", 80), ("sass", 90), ("ptx", 90)}


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
def test_builder_reports_compile_errors(tmp_path):
    (tmp_path / "broken.cu").write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="nvcc failed"):
        _cuda_build.build_library(tmp_path, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out" / _cuda_build.LIBRARY_NAME).exists()


def test_digest_follows_the_sources(tmp_path):
    (tmp_path / "a.cu").write_text("int a;\n")
    before = _cuda_build.sources_digest(tmp_path)
    (tmp_path / "a.cuh").write_text("int b;\n")
    assert _cuda_build.sources_digest(tmp_path) != before


def fake_nvcc(cuda_home: Path, fail: bool = False) -> Path:
    """An nvcc at cuda_home/bin/nvcc (found through $CUDA_HOME) that writes a dummy library, or fails."""
    nvcc = cuda_home / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    nvcc.write_text(f"#!{sys.executable}\nimport sys\n"
                    + ("sys.exit('nvcc: error in a kernel')\n" if fail else
                       "open(sys.argv[sys.argv.index('-o') + 1], 'wb').write(b'not a real library')\n"))
    nvcc.chmod(0o755)
    return nvcc


def test_sources_edited_during_the_compile_leave_no_library_stamped_current(tmp_path):
    """The digest was taken after nvcc finished: a source saved (or a git pull) during the compile stamped the
    old kernels with the new sources' digest, and the loader took them as current. The discarded compile leaves
    nothing either: its `.libkpro_cuda.so.PID.tmp` stayed in out_dir (pip's build/lib/kpro/_lib, so the wheel)
    when the finally's unlink was dropped, unseen by a glob of `libkpro_cuda.so*`."""
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("int a;\n")
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!{sys.executable}\nimport sys\n"  # compiles, then a save lands before it finishes
                    f"open(sys.argv[sys.argv.index('-o') + 1], 'wb').write(b'old kernels')\n"
                    f"open({str(tmp_path / 'csrc' / 'a.cu')!r}, 'a').write('int b;\\n')\n")
    nvcc.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"csrc changed while nvcc compiled it.*build again"):
        _cuda_build.build_library(tmp_path / "csrc", tmp_path / "out", nvcc=str(nvcc), verbose=False)
    assert library_files(tmp_path / "out") == set()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def loader_in(tmp_path: Path, monkeypatch, packaged: bytes | None = None, stamp: str | None = None):
    """kpro's library loader over a source tree in tmp_path (csrc/ with one source, kpro/_lib holding `packaged`
    stamped `stamp`) and a cache in tmp_path/cache."""
    from kpro.ops.cuda_kernels import library

    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("int a;\n")
    monkeypatch.setattr(library, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(library, "PACKAGE_LIB_DIR", tmp_path / "_lib")
    monkeypatch.setenv("KPRO_CACHE_DIR", str(tmp_path / "cache"))
    if packaged is not None:
        (tmp_path / "_lib").mkdir()
        (tmp_path / "_lib" / _cuda_build.LIBRARY_NAME).write_bytes(packaged)
    if stamp is not None:
        (tmp_path / "_lib" / (_cuda_build.LIBRARY_NAME + ".digest")).write_text(stamp + "\n")
    return library


def test_the_loader_rebuilds_a_cached_library_stamped_with_other_sources(tmp_path, monkeypatch):
    """The cache folder is named by the digest the loader took before the compile: sources saved before nvcc read
    them left other kernels under that name, loaded unchecked once the sources were back."""
    library = loader_in(tmp_path, monkeypatch)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    fake_nvcc(tmp_path / "cuda")
    cached = tmp_path / "cache" / f"cuda-{_cuda_build.sources_digest(tmp_path / 'csrc')}" / _cuda_build.LIBRARY_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"other kernels")
    cached.with_name(cached.name + ".digest").write_text("0123456789abcdef\n")
    assert library.library_path() == cached and cached.read_bytes() == b"not a real library"


@pytest.mark.parametrize("stamp, why", [("0123456789abcdef", "was built from other sources than csrc/"),
                                         (None, "has no .digest")])
def test_a_skipped_packaged_library_without_nvcc_says_why(tmp_path, monkeypatch, stamp, why):
    """The device machine (no nvcc) with a stale or unstamped kpro/_lib: the error said only "nvcc not found"."""
    library = loader_in(tmp_path, monkeypatch, packaged=b"old kernels", stamp=stamp)
    monkeypatch.setattr(_cuda_build, "find_nvcc", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        library.library_path()
    assert f"{tmp_path / '_lib' / _cuda_build.LIBRARY_NAME} {why}, so it was skipped" in str(err.value)
    assert "nvcc not found" in str(err.value) and "pip install -e ." in str(err.value)


def test_nvcc_is_searched_in_cuda_home_then_path_then_usr_local_cuda(tmp_path, monkeypatch):
    """As torch's cpp_extension: /usr/local/cuda came before PATH, so a toolkit put first on PATH went unused."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    on_path = fake_nvcc(tmp_path / "path")
    monkeypatch.setenv("PATH", f"{on_path.parent}{os.pathsep}{os.environ['PATH']}")
    assert _cuda_build.find_nvcc() == str(on_path)
    in_home = fake_nvcc(tmp_path / "home")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "home"))
    assert _cuda_build.find_nvcc() == str(in_home)


def library_files(directory: Path) -> set[str]:
    return {p.name for p in directory.glob(_cuda_build.LIBRARY_NAME + "*")}


def test_install_build_leaves_a_library_only_when_it_compiled_one(tmp_path, capsys):
    """A build directory reused from an earlier build (pip's build/lib) must not ship that build's library."""
    out = tmp_path / "build" / "kpro" / "_lib"

    def stale_build():
        out.mkdir(parents=True, exist_ok=True)
        (out / _cuda_build.LIBRARY_NAME).write_bytes(b"old kernels")
        (out / (_cuda_build.LIBRARY_NAME + ".digest")).write_text("0123456789abcdef\n")

    stale_build()
    assert _cuda_build.build_for_install(ROOT / "csrc", out, "0") is None
    assert library_files(out) == set()
    stale_build()
    broken = fake_nvcc(tmp_path / "broken", fail=True)
    assert _cuda_build.build_for_install(ROOT / "csrc", out, "auto", nvcc=str(broken)) is None
    assert library_files(out) == set() and "CUDA kernels not built" in capsys.readouterr().err
    stale_build()
    built = _cuda_build.build_for_install(ROOT / "csrc", out, "auto", nvcc=str(fake_nvcc(tmp_path / "ok")))
    assert built.read_bytes() == b"not a real library"
    assert (out / (built.name + ".digest")).read_text().strip() == _cuda_build.sources_digest(ROOT / "csrc")


def package_tree(tmp_path: Path) -> Path:
    """What setup.py needs to build kpro's wheel or sdist (its Python modules but the builder left out): fast."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, tree)
    (tree / "kpro").mkdir()
    (tree / "kpro" / "__init__.py").write_text("")
    shutil.copy(ROOT / "kpro" / "_cuda_build.py", tree / "kpro")
    return tree


def build(tree: Path, kind: str, out: Path, **env) -> subprocess.CompletedProcess:
    """setuptools' PEP 517 build_wheel or build_sdist in tree, as pip and `python -m build` call it, with this
    environment's setuptools: skipped where it is older than pyproject.toml's build requirement (a Python 3.11
    venv's own 65.5 where torch pulls in none), which pip's isolated build would meet with a newer one."""
    required = re.search(r'requires = \["setuptools>=(\d+)"\]', (ROOT / "pyproject.toml").read_text())
    assert required, "pyproject.toml's setuptools requirement is not where this check reads it: update it"
    have = importlib.metadata.version("setuptools")
    if int(have.split(".")[0]) < int(required[1]):
        pytest.skip(f"setuptools {have} here; pyproject.toml's build needs setuptools>={required[1]}")
    code = f"import sys; from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, **env})


def wheel_names(result: subprocess.CompletedProcess, out: Path) -> tuple[str, set[str]]:
    assert result.returncode == 0, result.stderr
    wheel = out / result.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as z:
        return wheel.name, set(z.namelist())


def test_a_wheel_carries_the_library_only_when_its_build_compiled_it(tmp_path):
    """Rebuilt in the same tree (build/ kept), the wheel of a KPRO_CUDA_BUILD=0 build or of a failed compile
    held the library of the first build, which an installed kpro loads unchecked."""
    tree, library = package_tree(tmp_path), f"kpro/_lib/{_cuda_build.LIBRARY_NAME}"
    env = {"CUDA_HOME": str(tmp_path / "cuda")}
    fake_nvcc(tmp_path / "cuda")
    _, names = wheel_names(build(tree, "wheel", tmp_path / "w1", **env), tmp_path / "w1")
    assert library in names
    _, names = wheel_names(build(tree, "wheel", tmp_path / "w2", KPRO_CUDA_BUILD="0", **env), tmp_path / "w2")
    assert library not in names and library + ".digest" not in names
    fake_nvcc(tmp_path / "cuda", fail=True)
    _, names = wheel_names(build(tree, "wheel", tmp_path / "w3", **env), tmp_path / "w3")
    assert library not in names and library + ".digest" not in names


def test_a_module_deleted_from_the_tree_leaves_the_next_wheel(tmp_path):
    """build/lib/kpro is reused across builds of a tree: a module deleted from kpro/ still shipped in the next
    wheel (and an installed kpro imported it)."""
    tree = package_tree(tmp_path)
    (tree / "kpro" / "removed.py").write_text("x = 1\n")
    _, names = wheel_names(build(tree, "wheel", tmp_path / "w1", KPRO_CUDA_BUILD="0"), tmp_path / "w1")
    assert "kpro/removed.py" in names
    (tree / "kpro" / "removed.py").unlink()
    _, names = wheel_names(build(tree, "wheel", tmp_path / "w2", KPRO_CUDA_BUILD="0"), tmp_path / "w2")
    assert "kpro/removed.py" not in names and "kpro/_cuda_build.py" in names


def test_a_wheel_holding_the_library_is_tagged_for_this_platform(tmp_path):
    """The library is machine code: a wheel with it was tagged py3-none-any, installable anywhere."""
    tree, env = package_tree(tmp_path), {"CUDA_HOME": str(tmp_path / "cuda")}
    fake_nvcc(tmp_path / "cuda")
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    for mode, tag, pure in [("auto", f"py3-none-{platform}", "false"), ("0", "py3-none-any", "true")]:
        name, _ = wheel_names(build(tree, "wheel", tmp_path / mode, KPRO_CUDA_BUILD=mode, **env), tmp_path / mode)
        assert name.endswith(f"-{tag}.whl")
        with zipfile.ZipFile(tmp_path / mode / name) as wheel:
            metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
        assert f"Root-Is-Purelib: {pure}" in metadata and f"Tag: {tag}" in metadata


def test_the_sdist_carries_csrc_and_its_wheel_compiles_the_kernels(tmp_path):
    """An sdist without csrc/ (what `python -m build` and an index build the wheel from) gave a wheel without
    kernels, even with KPRO_CUDA_BUILD=1, and said nothing."""
    tree = package_tree(tmp_path)
    (tree / "kpro" / "_lib").mkdir()
    (tree / "kpro" / "_lib" / _cuda_build.LIBRARY_NAME).write_bytes(b"a local build")
    result = build(tree, "sdist", tmp_path / "dist")
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "dist" / result.stdout.split()[-1]) as sdist:
        sdist.extractall(tmp_path / "unpacked", filter="data")
    source, = (tmp_path / "unpacked").iterdir()
    assert {p.name for p in (source / "csrc").iterdir()} == {p.name for p in (ROOT / "csrc").iterdir()}
    assert not (source / "kpro" / "_lib").exists()
    fake_nvcc(tmp_path / "cuda")
    _, names = wheel_names(build(source, "wheel", tmp_path / "w", KPRO_CUDA_BUILD="1", CUDA_HOME=str(tmp_path / "cuda")),
                           tmp_path / "w")
    assert f"kpro/_lib/{_cuda_build.LIBRARY_NAME}" in names


def test_required_build_without_sources_names_them(tmp_path, capsys):
    nvcc = str(fake_nvcc(tmp_path / "cuda"))
    with pytest.raises(FileNotFoundError, match="csrc is missing"):
        _cuda_build.build_for_install(tmp_path / "csrc", tmp_path / "out", "1", nvcc=nvcc)
    (tmp_path / "csrc").mkdir()
    with pytest.raises(FileNotFoundError, match="no .cu sources in .*csrc"):
        _cuda_build.build_for_install(tmp_path / "csrc", tmp_path / "out", "1", nvcc=nvcc)
    assert _cuda_build.build_for_install(tmp_path / "csrc", tmp_path / "out", "auto", nvcc=nvcc) is None
    assert "no .cu sources" in capsys.readouterr().err


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("0", "0"), ("1", "1")])
def test_cuda_build_mode_reads_0_1_or_auto(value, mode):
    assert _cuda_build.build_mode({} if value is None else {"KPRO_CUDA_BUILD": value}) == mode


@pytest.mark.parametrize("value", ["true", "yes", "off", "AUTO", " 1"])
def test_cuda_build_mode_refuses_other_spellings(value):
    """They meant auto: `off` compiled, `true` installed without kernels where nvcc was missing."""
    with pytest.raises(ValueError, match=r"KPRO_CUDA_BUILD=.*accepted: 0 .*, 1 .*, auto"):
        _cuda_build.build_mode({"KPRO_CUDA_BUILD": value})


def test_setup_refuses_an_unknown_cuda_build_mode(tmp_path):
    result = build(package_tree(tmp_path), "wheel", tmp_path / "w", KPRO_CUDA_BUILD="off")
    assert result.returncode != 0 and "KPRO_CUDA_BUILD='off'" in result.stderr


def test_ci_starts_from_a_fresh_virtual_environment():
    """`python3 -m venv DIR` keeps what an earlier run installed in DIR; --clear empties it first."""
    creates = [line.split() for line in (ROOT / ".ci" / "run").read_text().splitlines() if " -m venv " in line]
    assert creates and all("--clear" in words for words in creates)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kpro", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("command", [[]] + [[name] for name in COMMANDS])
def test_every_subcommand_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: python -m kpro" in result.stdout


def test_info_and_generate_on_a_saved_checkpoint(tmp_path, make_model):
    import kpro

    tok = kpro.CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'-ABCDEFGHIJKLMNOPQRSTUVW")
    model = make_model(dtype=torch.float32, vocab_size=tok.vocab_size)  # a larger tokenizer is refused
    kpro.save_pretrained(model, tmp_path)
    tok.save(tmp_path)
    info = run_cli("info", str(tmp_path))
    assert info.returncode == 0, info.stderr
    assert f"{model.num_parameters():,}" in info.stdout and "6 heads, 2 key/value heads" in info.stdout
    out = run_cli("generate", str(tmp_path), "--prompt", "hello", "--prompt", "a", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()  # each text under a header: a generated newline cannot blur where one ends
    assert len(lines) == 5 and lines[0] == "==> prompt 1 <==" and lines[1].startswith("hello"), lines
    assert lines[2:4] == ["", "==> prompt 2 <=="] and lines[4].startswith("a"), lines


def test_generate_prints_each_row_decoded_whole_with_sentencepiece(tmp_path):
    """SentencePiece drops the leading space of a piece decoded alone: the CLI decodes prompt + continuation
    together. The model is rigged so that every new token is a word piece starting with '▁'."""
    import kpro

    tok = kpro.Tokenizer(ROOT / "tests" / "data" / "sentencepiece_test_model.model")
    words = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("\u2581") and len(tok.id_to_piece(i)) > 2]
    torch.manual_seed(0)
    model = kpro.Llama(kpro.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, bos_token_id=tok.bos_id,
                                        eos_token_id=tok.eos_id))
    with torch.no_grad():  # logits = ±x_0 on two word pieces only: the argmax is one of them
        model.norm.weight.zero_()
        model.norm.weight[0] = 1
        model.lm_head.weight.zero_()
        model.lm_head.weight[words[0], 0], model.lm_head.weight[words[1], 0] = 1, -1
    kpro.save_pretrained(model, tmp_path)
    tok.save(tmp_path)
    out = run_cli("generate", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    prompt = tok.encode("hello world")
    new = kpro.generate(model, torch.tensor([prompt]), 3)[0, len(prompt):].tolist()
    assert set(new) <= set(words[:2])
    assert out.stdout.splitlines() == [tok.decode(prompt + new)]
    assert out.stdout.startswith("hello world ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_a_missing_cuda_device_is_a_one_line_error(tmp_path, make_model):
    import kpro

    kpro.save_pretrained(make_model(dtype=torch.float32), tmp_path)
    result = run_cli("generate", str(tmp_path), "--prompt", "a", "--device", "cuda")
    assert result.returncode == 1 and "CUDA is not available" in result.stderr and "Traceback" not in result.stderr


def test_cli_errors_are_one_line(tmp_path):
    result = run_cli("info", str(tmp_path / "missing"))
    assert result.returncode == 1 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
    result = run_cli("demo", "no-such-act")
    assert result.returncode == 1 and "unknown demo act" in result.stderr
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    result = run_cli("info", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config.json: missing required field(s) vocab_size, intermediate_size" in result.stderr


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
def test_cuda_library_builds_from_csrc_and_exports_every_entry_point():
    """The real kernels compile (here, or at install) and the ctypes signatures name real symbols."""
    from kpro.ops.cuda_kernels import library

    assert library.library_problem() is None, library.library_problem()
    lib = library._load()
    assert lib.kpro_library_version() == 1
    assert lib.kpro_error_string(2).decode()  # cudaErrorMemoryAllocation has a text, GPU or not
    for name in library.SIGNATURES:
        assert getattr(lib, name).argtypes == library.SIGNATURES[name]


def test_digest_follows_a_plain_header(tmp_path):
    """Guards: `*.h` dropped from the digest: an edited .h header kept a stale library stamped current."""
    (tmp_path / "a.cu").write_text("int a;\n")
    (tmp_path / "a.h").write_text("int b;\n")
    before = _cuda_build.sources_digest(tmp_path)
    (tmp_path / "a.h").write_text("int c;\n")
    assert _cuda_build.sources_digest(tmp_path) != before


def test_digest_follows_a_renamed_source(tmp_path):
    """Guards: file names dropped from the digest: moving a kernel's text to another file (one that an #include
    names, or none) left the digest unchanged."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "a.cu").write_text("int a;\n")
    (tmp_path / "two" / "b.cu").write_text("int a;\n")
    assert _cuda_build.sources_digest(tmp_path / "one") != _cuda_build.sources_digest(tmp_path / "two")


def test_digest_follows_the_target_architectures(tmp_path, monkeypatch):
    """Guards: gencode flags dropped from the digest: a library built for other GPUs stayed stamped current."""
    (tmp_path / "a.cu").write_text("int a;\n")
    before = _cuda_build.sources_digest(tmp_path)
    monkeypatch.setattr(_cuda_build, "ARCHITECTURES", ("80",))
    assert _cuda_build.sources_digest(tmp_path) != before


def test_nvcc_in_cuda_home_comes_before_cuda_path(tmp_path, monkeypatch):
    """Guards: $CUDA_PATH searched before $CUDA_HOME (torch's cpp_extension takes CUDA_HOME first)."""
    in_home, in_path = fake_nvcc(tmp_path / "home"), fake_nvcc(tmp_path / "path")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "path"))
    assert _cuda_build.find_nvcc() == str(in_home) != str(in_path)


def test_no_library_and_no_nvcc_names_no_skipped_library(tmp_path, monkeypatch):
    """Guards: `packaged.is_file() and` dropped: with no kpro/_lib library at all the error said that library
    "has no .digest, so it was skipped"; build_library's own "nvcc not found" is the message."""
    library = loader_in(tmp_path, monkeypatch)
    monkeypatch.setattr(library, "_loaded", {})
    monkeypatch.setattr(_cuda_build, "find_nvcc", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        library.library_path()
    assert "nvcc not found" in str(err.value) and "skipped" not in str(err.value)


def test_dtype_codes_match_the_kernels_enum():
    """Guards: bfloat16/float16 codes swapped: the kernels read bf16 bits as fp16 (wrong numbers, no error).
    Reference: csrc/common.cuh's `enum DType`."""
    from kpro.ops.cuda_kernels import library
    enum = (ROOT / "csrc" / "common.cuh").read_text()
    codes = {name: int(v) for name, v in re.findall(r"k(Float32|BFloat16|Float16) = (\d+)", enum)}
    assert codes == {"Float32": 0, "BFloat16": 1, "Float16": 2}  # the enum is where this test reads it
    for dtype, name in [(torch.float32, "Float32"), (torch.bfloat16, "BFloat16"), (torch.float16, "Float16")]:
        assert library.dtype_code(torch.empty(0, dtype=dtype)) == codes[name]


def test_a_failed_build_is_a_library_problem_not_an_exception(tmp_path, monkeypatch):
    """Guards: RuntimeError dropped from _load's except: nvcc failing in the loader's build raised out of
    library_problem() (asked by backend selection) instead of naming why the CUDA backend is unavailable."""
    library = loader_in(tmp_path, monkeypatch)
    monkeypatch.setattr(library, "_loaded", {})
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    fake_nvcc(tmp_path / "cuda", fail=True)
    problem = library.library_problem()
    assert problem.startswith("the CUDA library cannot be loaded: nvcc failed"), problem
