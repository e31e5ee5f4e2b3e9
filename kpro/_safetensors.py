"""A safetensors file's header, read without torch (`python -m kpro info` imports none): where each tensor's
bytes lie, with the structure checked, so that `info` and the streamed `expand` refuse a corrupt or truncated
file alike, naming it."""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import struct
from pathlib import Path

from .errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class TensorBytes:
    """Where a tensor's bytes are: a byte range of a safetensors file."""

    file: Path
    start: int  # absolute offset in the file
    nbytes: int
    dtype: str  # safetensors dtype code ("BF16", "F32", ...)
    shape: tuple[int, ...]


# Bits an element of each dtype code takes: the codes the safetensors library (0.6+) reads.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6, "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64,
              "I64": 64, "F64": 64, "C64": 64}


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def described_non_checkpoint(path: Path) -> str | None:
    """What `path` is and what to pass instead, where it is something given for a checkpoint directory that is
    none: a GGUF file, a training run's directory (OUT/final, OUT/step-N inside), a bitune run's or its adapters.
    None for anything else."""
    path = Path(path)
    if path.is_file():
        try:
            with path.open("rb") as f:
                gguf = f.read(4) == b"GGUF"
        except OSError:
            gguf = False
        if gguf or path.suffix.lower() == ".gguf":
            return (f"{path} is a GGUF file, not a checkpoint directory: convert it first, python -m kpro "
                    f"convert-gguf {shlex.quote(str(path))} OUT")
        return None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    load = "load onto the base model they were tuned from: kpro.bitune.load_tuned(kpro.load_pretrained(BASE), {!r}) " \
           "(docs/bitune.md)"
    if (path / "adapter_config.json").is_file():
        return f"{path} holds adapters (adapter_config.json), not a model: they {load.format(str(path))}"
    if (path / "adapters" / "adapter_config.json").is_file():
        adapters = path / "adapters"
        return f"{path} is a bitune run's directory, not a checkpoint: its adapters, {adapters}, " + \
            load.format(str(adapters))
    if (path / "module.safetensors").is_file() and (path / "trainer_state.pt").is_file():
        return (f"{path} is a training checkpoint holding a module's state dict (module.safetensors: a model with LoRA "
                "layers, or one saved without its frozen weights, fit(save_frozen=False) or train-expanded "
                "--no-save-frozen), which only the resume of its run reads; load the run's final model (OUT/final), "
                "or save the model itself with kpro.save_pretrained")
    run = f"{path} is a training run's directory, not a checkpoint: pass "
    if (path / "final" / "config.json").is_file():
        return run + f"{path / 'final'}, its final model"
    steps = [p for p in path.glob("step-*") if p.name[5:].isdigit() and (p / "config.json").is_file()]
    if steps:
        return run + f"its newest checkpoint, {max(steps, key=lambda p: int(p.name[5:]))}"
    return None


def check_checkpoint_directory(directory: Path) -> None:
    """A checkpoint directory given by the user exists, is a directory (a typo is named as one) and holds a
    config.json: checked before its tokenizer is looked for, which would otherwise speak for a folder that is no
    checkpoint at all. What is mistaken for one (a GGUF file, a run's directory, adapters) is named as such."""
    described = described_non_checkpoint(directory)
    if described is not None:
        raise CheckpointError(described)
    if directory.is_file():
        holder = f": pass {directory.parent}, the checkpoint holding it" \
            if (directory.parent / "config.json").is_file() else ""
        raise FileNotFoundError(f"{directory} is a file, not a checkpoint directory{holder}")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no config.json at {directory / 'config.json'}")


def sharded_weight_map(directory: Path) -> dict[str, str] | None:
    """The checked "weight_map" of the checkpoint directory `directory`'s index, or None where it holds a single
    model.safetensors; both (ambiguous), or neither, is a CheckpointError. load_pretrained's and `info`'s rule."""
    index, single = directory / INDEX_NAME, directory / WEIGHTS_NAME
    if index.is_file() and single.is_file():  # transformers would read one, older tools the other
        raise CheckpointError(f"{directory} holds both {WEIGHTS_NAME} and a sharded checkpoint ({INDEX_NAME}); which "
                              "one is the model is ambiguous: remove the other")
    if index.is_file():
        return read_weight_map(index)
    if single.is_file():
        return None
    present = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME} (it holds: {', '.join(present) or 'nothing'}); "
                          "kpro reads safetensors checkpoints only")


def read_weight_map(index: Path) -> dict[str, str]:
    """The "weight_map" of the safetensors index file `index` (tensor name -> shard file name beside it), checked
    as load_pretrained and `info` both read it: an object of names to file names, every file present."""
    def unique_keys(pairs):  # json.loads would keep the last of a name listed twice, as if it were the only one
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{index} is not a valid safetensors index: it lists {key!r} twice "
                                      f"({json.dumps(seen[key])[:80]} and {json.dumps(value)[:80]}); which entry "
                                      "holds cannot be told: remove the other")
            seen[key] = value
        return seen

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) and isinstance(file, str)
                                                   for name, file in weight_map.items()):
        raise CheckpointError(f"{index} is not a valid safetensors index: its 'weight_map' must map each tensor "
                              "name to a shard file name")
    # A plain file name beside the index: a downloaded index naming ../other/model.safetensors or an absolute path
    # would load (and expand copy) weights from outside the checkpoint
    outside = sorted({f for f in weight_map.values() if f in ("", ".", "..") or "/" in f or "\\" in f})
    if outside:
        raise CheckpointError(f"{index} maps tensors to file(s) that are not a plain file name in its directory: "
                              f"{', '.join(map(json.dumps, outside[:4]))}; a checkpoint's shards lie beside its index")
    missing_files = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing_files:
        raise CheckpointError(f"{index} names shard file(s) that do not exist: {', '.join(missing_files)}")
    return weight_map


def read_header(file: Path) -> dict[str, TensorBytes]:
    """{tensor name: TensorBytes} of `file`, the header checked as the safetensors library checks it (so that
    what `load_pretrained` refuses is not described or copied here): each entry a known "dtype" code, a "shape"
    list of sizes and two "data_offsets" spanning exactly the bytes the shape takes; the tensors' bytes back to
    back from the start of the data to the file's end; a "__metadata__" of strings to strings. Anything else is a
    CheckpointError naming the file (and the tensor)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or length > size - 8:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file} has an unreadable safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has an unreadable safetensors header (a JSON {type(header).__name__}, not an "
                              "object); the file is corrupt")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(value, str) for value in metadata.values())):
        raise CheckpointError(f"{file}: __metadata__ must be an object of strings to strings, got "
                              f"{json.dumps(metadata)[:80]}; the file is corrupt")
    data_start, entries = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(entry.get("dtype"), str)):
            raise CheckpointError(f"{file}: the header entry of {name} is malformed (needs a \"dtype\" string and a "
                                  f"\"shape\" list of sizes, got {json.dumps(entry)[:80]}); the file is corrupt")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{file}: the header entry of {name} has no valid \"data_offsets\" (two byte "
                                  f"offsets, got {json.dumps(offsets)[:80]}); the file is corrupt")
        dtype, numel = entry["dtype"], math.prod(shape)
        if dtype not in DTYPE_BITS:
            raise CheckpointError(f"{file}: tensor {name} has an unknown dtype code {dtype!r} (safetensors knows "
                                  f"{', '.join(DTYPE_BITS)}); the file is corrupt")
        nbytes, bits = offsets[1] - offsets[0], numel * DTYPE_BITS[dtype]
        if nbytes * 8 != bits:
            needs = bits // 8 if bits % 8 == 0 else bits / 8
            raise CheckpointError(f"{file}: tensor {name} takes {nbytes} bytes, but its shape {shape} in {dtype} "
                                  f"needs {needs}; the file is corrupt")
        entries[name] = TensorBytes(file, data_start + offsets[0], nbytes, dtype, tuple(shape))
    # Offsets pointing at another tensor's bytes (or leaving bytes no tensor owns) are what a corrupt or hand-made
    # header looks like; the streamed `expand` would copy whatever they point at.
    end = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].nbytes)):
        if entry.start != end:
            where = "the tensor before it ends" if end > data_start else "the data begins"
            offsets = [entry.start - data_start, entry.start - data_start + entry.nbytes]
            raise CheckpointError(f"{file}: tensor {name}'s data_offsets {offsets} do not start where {where} (byte "
                                  f"{end - data_start}): tensors overlap or leave a gap; the file is corrupt")
        end += entry.nbytes
    # A file cut short (a download, a full disk) ends before the last tensor's bytes
    if end > size:
        raise CheckpointError(f"{file} is truncated: its header places tensor data up to byte {end:,}, the file has "
                              f"{size:,} bytes; write or download it again")
    if end < size:
        raise CheckpointError(f"{file}: the tensors' data ends at byte {end - data_start:,} of the data, but the file "
                              f"holds {size - data_start:,} bytes of data after its header; the file is corrupt")
    return entries
