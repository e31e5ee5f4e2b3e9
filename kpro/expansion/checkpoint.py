"""Expand an HF-layout checkpoint directory without loading the model (`python -m kpro expand`).

Tensors are never materialised: each one's bytes are copied from its source file into the new files
through one fixed buffer, renamed to its new block index, and the new blocks' `o_proj` and `down_proj`
are written as zero bytes (0.0 in every floating-point format). Memory use is that buffer, whatever the
checkpoint size, and dtypes are kept bit for bit. The output is written under a temporary name and
swapped into place (`kpro.checkpoint.atomic_directory`), with `config.json` (the source's, with the new
`num_hidden_layers` and `layer_types` extended), the tokenizer and other non-weight files of the source,
and `kpro_expansion.json` (which blocks are new, for `python -m kpro train-expanded`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path

import torch

from ..checkpoint import (_SAFETENSORS_DTYPES, CONFIG_NAME, GGUF_RECORD, INDEX_NAME, WEIGHTS_NAME, CheckpointError,
                          _check_names_and_shapes, _unlisted_tensors, hf_tensors, parse_size, tensor_locations,
                          tied_head_differs, unreplaced)
from .._files import atomic_directory
from .._run_lock import LOCK_FILE, holding
from .._safetensors import TensorBytes as _Source, check_checkpoint_directory, read_header
from ..config import LlamaConfig
from ..model import Llama
from ..tokenizer import CHAT_TEMPLATE_DIR
from ..train.checkpointing import RUN_FILES
from ..train.shards import FORMAT as SHARD_FORMAT, INDEX_FILE as SHARD_INDEX
from .layout import expansion_layout

EXPANSION_FILE = "kpro_expansion.json"
# Files of other weight formats are left behind: they hold the unexpanded model.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
MODEL_FILES = (CONFIG_NAME, INDEX_NAME, "generation_config.json", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja", "vocab.json", "merges.txt")
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
COPY_BUFFER_BYTES = 16 << 20


def _holds_token_shards(directory: Path) -> bool:
    """Whether `directory` holds the index of kpro's token shards (`python -m kpro tokenize`)."""
    try:
        index = json.loads((directory / SHARD_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == SHARD_FORMAT


@dataclasses.dataclass
class ExpansionResult:
    directory: Path
    original_blocks: int
    new_blocks: list[int]
    weight_files: list[str]
    copied_files: list[str]  # tokenizer and other files taken along from the source
    skipped: list[str]  # entries of the source left behind (weights in other formats, training state, subdirectories)
    # the source's own new blocks still untrained (named by its kpro_expansion.json, their o_proj and down_proj
    # still zero), by their index here: the record lists them with the new ones, for train-expanded
    earlier_new_blocks: list[int] = dataclasses.field(default_factory=list)


def expand_checkpoint(src, dst, num_new_blocks: int, position: str = "interleave", *,
                      max_shard_size: int | str = "5GB", overwrite: bool = False,
                      buffer_bytes: int = COPY_BUFFER_BYTES) -> ExpansionResult:
    """Write the expansion of checkpoint `src` to `dst` (see the module docstring); returns what was written."""
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 1:
        raise ValueError(f"buffer_bytes must be a positive integer, got {buffer_bytes!r}")
    if not isinstance(overwrite, bool):  # "False" is truthy: it would replace the destination
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    src, dst = Path(src), Path(dst)
    check_checkpoint_directory(src)
    source, target = src.resolve(), dst.resolve()
    if target == source or source in target.parents or target in source.parents:
        what = "is the source" if target == source else "is inside the source" if source in target.parents \
            else "holds the source"
        raise ValueError(f"the destination {dst} {what} {src}: expand writes a new checkpoint beside it (the output "
                         "replaces its destination whole); choose another directory")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; choose a directory")
    # a run lock file alone is what an expand killed outright left (the lock itself went with the process)
    if dst.exists() and any(entry.name != LOCK_FILE for entry in dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; choose a new directory, or overwrite=True "
                              "(--overwrite) to replace it")
    if dst.is_dir() and _holds_token_shards(dst):  # its tokens-*.bin would go as weights, its index.json stay
        raise ValueError(f"the destination {dst} holds token shards (index.json of `python -m kpro tokenize`), which "
                         "overwrite (--overwrite) would break: their tokens-*.bin are weights of another format to "
                         "it; choose another directory")
    max_shard_bytes = parse_size(max_shard_size)
    if not (src / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{src} has no {CONFIG_NAME}")
    # config.json, the headers and each shard (as it is copied) are read by path, one after another. DST is held as
    # fit holds its run directory: replaced under a run writing there, it would mix two runs.
    with holding(dst), unreplaced(src, "expanding it") as source_unchanged:
        cfg = LlamaConfig.from_hf(src)  # its errors name the file
        raw_config = json.loads((src / CONFIG_NAME).read_text(encoding="utf-8"))
        sources, unlisted = _read_headers(src)
        _check_against_config(src, cfg, sources, unlisted, buffer_bytes)
        layout = expansion_layout(cfg.num_hidden_layers, num_new_blocks, position)
        plan = _output_tensors(sources, layout)
        shards = _plan_shards(plan, max_shard_bytes)
        new_blocks = [i for i, (_, new) in enumerate(layout) if new]
        record = read_expansion_record(src, command="expand")
        untrained = _untrained_blocks(sources, record["new_blocks"]) if record is not None else []
        earlier = [i for i, (source, new) in enumerate(layout) if not new and source in untrained]

        # --overwrite replaces a model directory's files (weights of any format, config, tokenizer, what the source
        # holds); a user's other files and directories in DST stay, as save_pretrained keeps them
        def written_by_an_expansion(name: str) -> bool:
            return name in MODEL_FILES or name.startswith(("tokenizer", "kpro_")) or name.endswith(WEIGHT_SUFFIXES) \
                or (src / name).is_file() or name == CHAT_TEMPLATE_DIR

        with atomic_directory(dst, drop=written_by_an_expansion) as tmp:
            names = [WEIGHTS_NAME] if len(shards) == 1 else [
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            buffer = bytearray(buffer_bytes)
            for file, shard in zip(names, shards):
                _write_safetensors(tmp / file, [(name, plan[name]) for name in shard], buffer)
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(_nbytes(plan[n]) for n in plan)},
                         "weight_map": {name: file for file, shard in zip(names, shards) for name in shard}}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (tmp / CONFIG_NAME).write_text(json.dumps(_expanded_config(raw_config, layout), indent=2) + "\n")
            copied, skipped = _copy_other_files(src, tmp)
            record = {"original_num_hidden_layers": cfg.num_hidden_layers, "num_new_blocks": num_new_blocks,
                      "position": position, "new_blocks": sorted(new_blocks + earlier),
                      "copied_from": [source for source, _ in layout]}
            if earlier:
                record["earlier_new_blocks"] = earlier
            (tmp / EXPANSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
            source_unchanged()  # before the swap: every source file has been read (the output is not written)
    return ExpansionResult(dst, cfg.num_hidden_layers, new_blocks, names, copied, skipped, earlier)


# what to do about a record that is broken or stale, by the command that reads it: train-expanded reads it for the
# blocks to train, expand for the source's untrained blocks (refused, not ignored: those would become ordinary
# blocks of the new expansion without a word)
_REMEDIES = {"train-expanded": ("fix it, or name the blocks with --train-blocks",
                                "delete it and name the blocks to train (--train-blocks), or expand again"),
             "expand": ("fix it, or delete it to expand this checkpoint (the new record then names only this "
                        "expansion's new blocks)",
                        "delete it to expand this checkpoint (the new record then names only this expansion's new "
                        "blocks)")}


def read_expansion_record(directory, command: str = "train-expanded") -> dict | None:
    """The `kpro_expansion.json` of an expanded checkpoint, or None when it has none; a broken or stale one is
    refused, saying what to do for `command` ("train-expanded" or "expand")."""
    broken, stale = _REMEDIES[command]
    path = Path(directory) / EXPANSION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}; {broken}") from None
    blocks = record.get("new_blocks") if isinstance(record, dict) else None
    if not isinstance(blocks, list) or not blocks or \
            not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
        raise CheckpointError(f"{path} must hold {{\"new_blocks\": [block indices]}}, a non-empty list of integers "
                              f"(written by `python -m kpro expand`); {broken}")
    _check_record_matches_config(path, record, stale)
    return record


def _check_record_matches_config(path: Path, record: dict, remedy: str) -> None:
    """A record of an expansion to another number of blocks than config.json's is stale: kpro.save_pretrained
    of another model (expanded again, say) into the directory keeps it, and its indices name other blocks."""
    copied_from, config = record.get("copied_from"), path.parent / CONFIG_NAME
    if not isinstance(copied_from, list) or not config.is_file():
        return  # a record written by hand may name the blocks only; train_only checks their range
    try:
        blocks = json.loads(config.read_text(encoding="utf-8")).get("num_hidden_layers")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # loading the checkpoint says what is wrong with its config
    if blocks != len(copied_from):
        raise CheckpointError(f"{path} records an expansion to {len(copied_from)} blocks, but {config} has "
                              f"num_hidden_layers={blocks}: it is stale (another model was saved into this directory "
                              f"since `python -m kpro expand` wrote it); {remedy}")


# ------------------------------------------------------------------------------------------------ reading

def _read_headers(directory: Path) -> tuple[dict[str, _Source], list[tuple[str, Path, Path | None]]]:
    """Every tensor of the checkpoint: where its bytes are, read from the safetensors headers only; and the
    tensors a shard holds where its index does not place them (`_unlisted_tensors`), which the output would
    leave out."""
    locations = tensor_locations(directory)
    headers = {file: read_header(file) for file in sorted(set(locations.values()))}
    sources = {}
    for file, header in headers.items():
        for name, source in header.items():
            if locations.get(name) == file:  # an index decides which file holds a name
                sources[name] = source
    missing = sorted(name for name in locations if name not in sources)
    if missing:
        raise CheckpointError(f"{directory / INDEX_NAME} maps tensor(s) to files that do not hold them: "
                              f"{', '.join(missing[:5])}")
    return sources, _unlisted_tensors(locations, headers)


def _check_against_config(directory: Path, cfg: LlamaConfig, sources: dict[str, _Source],
                          unlisted: list[tuple[str, Path, Path | None]], buffer_bytes: int) -> None:
    """Refuse what load_pretrained refuses: tensors missing, unexpected or mis-shaped; a weight that is not
    floating point (F8 included); a tied config's lm_head.weight, saved anyway, other than the embedding."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {name: tuple(t.shape) for name, t in hf_tensors(model).items()}
    _check_names_and_shapes(directory, expected, {name: s.shape for name, s in sources.items()},
                            tied=cfg.tie_word_embeddings, unlisted=unlisted)
    for name in [*expected, "lm_head.weight"]:
        if name in sources and sources[name].dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{sources[name].file}: tensor {name} has dtype {sources[name].dtype}; expected "
                                  f"{', '.join(list(_SAFETENSORS_DTYPES)[:-1])} or {list(_SAFETENSORS_DTYPES)[-1]}")
    if cfg.tie_word_embeddings and "lm_head.weight" in sources and \
            not _same_values(sources["lm_head.weight"], sources["model.embed_tokens.weight"], buffer_bytes):
        raise tied_head_differs(directory)


def _same_values(head: _Source, embedding: _Source, buffer_bytes: int) -> bool:
    """Whether `head` equals `embedding` (of one shape) in the embedding's dtype, as load_pretrained compares a
    tied head saved anyway, read chunk by chunk through about `buffer_bytes`."""
    head_size = _SAFETENSORS_DTYPES[head.dtype].itemsize  # _check_against_config has refused other dtypes
    embedding_size = _SAFETENSORS_DTYPES[embedding.dtype].itemsize
    count, step = embedding.nbytes // embedding_size, max(1, buffer_bytes // (head_size + embedding_size))
    head_chunk, embedding_chunk = bytearray(step * head_size), bytearray(step * embedding_size)
    with open(head.file, "rb") as head_file, open(embedding.file, "rb") as embedding_file:
        for first in range(0, count, step):
            n = min(step, count - first)
            values = []
            for source, file, chunk, size in ((head, head_file, head_chunk, head_size),
                                              (embedding, embedding_file, embedding_chunk, embedding_size)):
                file.seek(source.start + first * size)
                if file.readinto(memoryview(chunk)[:n * size]) != n * size:
                    raise CheckpointError(f"{source.file} ended early (truncated while being read?)")
                values.append(torch.frombuffer(chunk, dtype=_SAFETENSORS_DTYPES[source.dtype], count=n))
            if not torch.equal(values[0].to(values[1].dtype), values[1]):
                return False
    return True


# ------------------------------------------------------------------------------------------------ writing

PER_LAYER_FIELDS = ("layer_types",)  # config.json lists with one entry per block, extended with the blocks


def _expanded_config(raw_config: dict, layout) -> dict:
    """The source's config.json for the expanded model: the new `num_hidden_layers`, and each per-layer list
    (`layer_types`) given a new block's entry copied from the block it copies (`LlamaConfig.from_hf` has
    refused a list that is not one entry per block)."""
    out = {**raw_config, "num_hidden_layers": len(layout)}
    for key in PER_LAYER_FIELDS:
        if raw_config.get(key) is not None:
            out[key] = [raw_config[key][source] for source, _ in layout]
    return out


def _output_tensors(sources: dict[str, _Source], layout) -> dict[str, _Source | tuple]:
    """Output name -> its source, or ("zeros", source) for a new block's zeroed projection; in file order:
    the non-block tensors that come first in the source, the blocks in their new order, then the rest."""
    by_block: dict[int, list[tuple[str, _Source]]] = {}
    before, after = {}, {}
    for name, source in sources.items():
        match = _LAYER_RE.fullmatch(name)
        if match:
            by_block.setdefault(int(match.group(1)), []).append((match.group(2), source))
        else:
            (after if name.startswith(("model.norm.", "lm_head.")) else before)[name] = source
    plan: dict[str, _Source | tuple] = dict(before)
    for index, (original, new) in enumerate(layout):
        for suffix, source in sorted(by_block.get(original, [])):
            plan[f"model.layers.{index}.{suffix}"] = ("zeros", source) if new and suffix in ZEROED else source
    plan.update(after)
    return plan


def _nbytes(entry) -> int:
    return (entry[1] if isinstance(entry, tuple) else entry).nbytes


def _plan_shards(plan: dict, max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, entry in plan.items():
        if current and size + _nbytes(entry) > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += _nbytes(entry)
    return shards + [current]


def _write_safetensors(path: Path, entries: list[tuple[str, _Source | tuple]], buffer: bytearray) -> None:
    """A safetensors file written tensor by tensor: the header, then each tensor's bytes in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, entry in entries:
        source = entry[1] if isinstance(entry, tuple) else entry
        header[name] = {"dtype": source.dtype, "shape": list(source.shape), "data_offsets": [offset, offset + source.nbytes]}
        offset += source.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    view = memoryview(buffer)
    handles: dict[Path, object] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for _, entry in entries:
                if isinstance(entry, tuple):
                    _write_zeros(out, entry[1].nbytes, view)
                else:
                    if entry.file not in handles:
                        handles[entry.file] = open(entry.file, "rb")
                    _copy_range(handles[entry.file], entry.start, entry.nbytes, out, view)
    finally:
        for handle in handles.values():
            handle.close()


def _untrained_blocks(sources: dict[str, _Source], blocks: list[int]) -> list[int]:
    """The blocks whose o_proj and down_proj are still the zero bytes `expand` wrote: new, never trained.
    (A record alone cannot tell: kpro.save_pretrained of the trained model into the directory keeps it.)"""
    def zero(entry: _Source) -> bool:
        with open(entry.file, "rb") as file:
            file.seek(entry.start)
            left = entry.nbytes
            while left:
                chunk = file.read(min(left, COPY_BUFFER_BYTES))
                if not chunk:
                    raise CheckpointError(f"{entry.file} ended early (truncated while being read?)")
                if chunk.count(0) != len(chunk):
                    return False
                left -= len(chunk)
        return True
    entries = lambda block: [sources.get(f"model.layers.{block}.{name}") for name in ZEROED]
    return [block for block in blocks if all(entry is not None and zero(entry) for entry in entries(block))]


def _copy_range(src, start: int, nbytes: int, out, view: memoryview) -> None:
    src.seek(start)
    while nbytes:
        got = src.readinto(view[:min(nbytes, len(view))])
        if not got:
            raise CheckpointError(f"{src.name} ended early (truncated while being read?)")
        out.write(view[:got])
        nbytes -= got


def _write_zeros(out, nbytes: int, view: memoryview) -> None:
    zeros = view[:min(nbytes, len(view))]
    zeros[:] = bytes(len(zeros))
    while nbytes:
        out.write(zeros[:min(nbytes, len(zeros))])
        nbytes -= min(nbytes, len(zeros))


def _copy_other_files(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    """Copy the tokenizer and the other plain files of `src` (not its weights, config or index, nor
    convert-gguf's record) into `dst`, never over an entry `dst` holds already."""
    copied, skipped = [], []
    for entry in sorted(src.iterdir()):
        name = entry.name
        # GGUF_RECORD marks convert-gguf's own output, which a later conversion replaces: not this model
        if name in (CONFIG_NAME, EXPANSION_FILE, GGUF_RECORD) or name.endswith((".index.json", ".safetensors")):
            continue  # rewritten for the expanded model
        # fit's files of a training checkpoint used as the source: its step and optimizer, not this model's; and
        # what `dst` holds (a training checkpoint's own trainer_state.json, written before its on_save callbacks)
        if name in RUN_FILES or (dst / name).exists() or (dst / name).is_symlink():
            skipped.append(name)
            continue
        if name == CHAT_TEMPLATE_DIR and entry.is_dir():  # the tokenizer's other chat templates
            shutil.copytree(entry, dst / name, dirs_exist_ok=True)
            copied.append(name)
            continue
        if entry.is_dir() or not entry.is_file() or name.endswith(WEIGHT_SUFFIXES):
            skipped.append(name)
            continue
        shutil.copy2(entry, dst / name)
        copied.append(name)
    return copied, skipped
