"""Checkpoints in the Hugging Face LLaMA directory layout.

A directory holds `config.json` and either `model.safetensors` or shards `model-0000x-of-0000y.safetensors`
with `model.safetensors.index.json`. Tensor names are the model's parameter names with a `model.` prefix
(`lm_head.weight` has none, and is absent when the embeddings are tied).

Loading builds the model on the meta device and fills it tensor by tensor from safetensors' memory map,
so a checkpoint is never held twice in memory; a directory that a save replaces meanwhile is loaded again, so
that every file comes from one version of it. Saving writes a complete new directory under a temporary
name and swaps it into place, so an interrupted save leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import distributed
from ._files import atomic_directory, naming_write_failures, save_safetensors
from ._safetensors import INDEX_NAME, WEIGHTS_NAME, described_non_checkpoint, sharded_weight_map
from .config import LlamaConfig
from .errors import CheckpointError, listed
from .lora import LoRALinear, is_lora_key
from .model import Llama

CONFIG_NAME = "config.json"
# convert-gguf's record of what a directory was converted from: it lets a later conversion replace the directory
# as its own output, so a save of other weights there drops it (or the conversion would replace them silently)
GGUF_RECORD = "kpro_gguf.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Buffers that older conversions saved and Hugging Face ignores on load; they hold nothing we need.
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_name(name: str) -> str:
    """kpro parameter name -> checkpoint tensor name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def hf_tensors(model: Llama, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds, by checkpoint name (tied lm_head left out).

    `state_dict` replaces `model.state_dict()`: a sharded model's full state, gathered by the caller.
    LoRA adapters are not part of a LLaMA checkpoint: a layer must have its adapter merged into the
    base weight (`LoRALinear.merge`), or the adapters are saved on their own (Bitune.save_adapters).
    """
    unmerged = [name for name, module in model.named_modules() if isinstance(module, LoRALinear) and module.merged is None]
    if unmerged:
        raise CheckpointError(f"{len(unmerged)} LoRA layers (first: {unmerged[0]}) have unmerged adapters; merge one "
                              "adapter into the base weights first, or save the adapters with save_adapters()")
    # refused as the forward refuses it: the weight would be saved with other values than the merged adapter's
    stale = [(name, module.merge_stale()) for name, module in model.named_modules()
             if isinstance(module, LoRALinear) and module.merge_stale()]
    if stale:
        raise CheckpointError(f"{len(stale)} merged LoRA layers changed since the merge (first: {stale[0][0]}: "
                              f"{stale[0][1]})")
    tied = model.config.tie_word_embeddings
    state_dict = model.state_dict() if state_dict is None else state_dict
    head, embedding = state_dict.get("lm_head.weight"), state_dict.get("embed_tokens.weight")
    if not tied and head is not None and embedding is not None and head.data_ptr() == embedding.data_ptr() != 0:
        raise CheckpointError("lm_head.weight is the embedding, but config.tie_word_embeddings is False: an untied "
                              "checkpoint stores both, and would load them as two tensors. Tie the config "
                              "(model.config = model.config.replace(tie_word_embeddings=True)), or give the head its "
                              "own copy (model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.clone()))")
    if tied and head is not None and embedding is not None and not (
            head.data_ptr() == embedding.data_ptr() or torch.equal(head, embedding)):
        raise CheckpointError("config.tie_word_embeddings is True, but lm_head.weight is no longer the embedding "
                              "(load_state_dict(assign=True) unties them, for one): a tied checkpoint would drop it. "
                              "Tie them again (model.lm_head.weight = model.embed_tokens.weight), or untie the config "
                              "(model.config = model.config.replace(tie_word_embeddings=False))")
    return {hf_name(name): tensor for name, tensor in state_dict.items()
            if not (tied and name == "lm_head.weight") and not is_lora_key(name)}  # adapters and merge marks


def checkpoint_tensors(model: Llama, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`hf_tensors`, checked against the model's config: the tensors its config.json describes, which loaders
    build and fill (a block appended by hand, the config left as it was, is refused by name)."""
    tensors = hf_tensors(model, state_dict)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in hf_tensors(Llama(model.config)).items()}
    _check_names_and_shapes(None, expected, {name: tuple(t.shape) for name, t in tensors.items()},
                            tied=model.config.tie_word_embeddings,
                            what="the model does not match its config (model.config), which the checkpoint's "
                                 "config.json would hold (after changing its blocks, set model.config = "
                                 "model.config.replace(...))")
    return tensors


# ----------------------------------------------------------------------------------------------- load

# dtype names load_pretrained takes besides torch dtypes ("auto": the checkpoint's own)
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_pretrained(directory: str | os.PathLike, dtype: torch.dtype | str = "auto", device="cpu", *,
                    strict_config: bool = False) -> Llama:
    """Load an HF-layout LLaMA checkpoint directory as a `kpro.Llama` in `dtype` on `device`.

    dtype          "auto" (the default): each tensor's own, as stored (float32 norms beside bfloat16 matrices
                   stay so; matrices of several dtypes are refused: the model computes in one), or a floating
                   torch dtype, or its name ("bf16", "bfloat16", "float32", ...), for every tensor.
    strict_config  refuse config fields kpro does not know (default: one ConfigWarning naming them, as
                   `LlamaConfig.from_hf`); fields that change the math are refused either way.
    """
    directory = Path(directory)
    described = described_non_checkpoint(directory)  # a GGUF file, a run's directory, adapters
    if described is not None:
        raise CheckpointError(described)
    if directory.is_file():  # the folder holding it is named only where it is a checkpoint
        holder = f" ({directory.parent})" if (directory.parent / CONFIG_NAME).is_file() else ""
        raise CheckpointError(f"{directory} is a file; load_pretrained takes the checkpoint directory that holds "
                              f"config.json and the weights{holder}")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    wanted = checked_dtype(dtype)
    # config.json, the index and each shard are opened by path one after another: a save_pretrained into the
    # directory meanwhile (it swaps a new directory in) would mix two checkpoints. Every file opened, the directory
    # must be the one it was before the first; else the load starts again (the shards are memory-mapped: what is
    # open stays readable after the old directory is removed). A file rewritten in place (cp over it, rsync
    # --inplace) leaves the directory as it was, and is read through the map as it changes: each file's version,
    # taken before it is read, must be the same once every tensor is copied out; else the load starts again too.
    for _ in range(LOAD_ATTEMPTS):
        version = directory_version(directory)
        files = {path: file_version(path) for path in (directory / CONFIG_NAME, directory / INDEX_NAME,
                                                       directory / WEIGHTS_NAME)}

        def unchanged() -> bool:
            return directory_version(directory) == version and all(file_version(path) == seen
                                                                   for path, seen in files.items())
        try:
            cfg = LlamaConfig.from_hf(directory / CONFIG_NAME, strict=strict_config)
            location = tensor_locations(directory)
            files.update({path: file_version(path) for path in set(location.values()) - files.keys()})
            opened = _open_all(set(location.values()))
            handles = opened.__enter__()
        except Exception:
            if unchanged():
                raise
            continue  # replaced or rewritten while being read: what failed may be a mix of two checkpoints
        if directory_version(directory) != version:
            opened.__exit__(None, None, None)
            continue
        try:
            with opened:
                model = _load_opened(directory, cfg, location, handles, wanted, device)
        except Exception:
            if unchanged():
                raise
            continue
        if unchanged():
            return model
    raise CheckpointError(f"{directory} was replaced or rewritten {LOAD_ATTEMPTS} times while loading it (another "
                          "process saving into it?); load it when no save is in progress, or save to a new directory "
                          "each time")


# loads of a directory that a save replaced (or rewrote in place) meanwhile, started again before giving up
LOAD_ATTEMPTS = 5


def directory_version(directory: Path) -> tuple | None:
    """What changes when `directory` is replaced by another (atomic_directory swaps a new one in), or an entry of
    it is added, removed or renamed; None where there is none. The ctime guards against a new directory given the
    inode number of one removed meanwhile. A file rewritten in place changes none of it: see `file_version`."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


def file_version(path: Path) -> tuple | None:
    """What changes when the file at `path` is replaced, or rewritten in place (its modification time, to the file
    system's timestamp resolution, and its size); None where there is none."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


@contextlib.contextmanager
def unreplaced(directory: Path, doing: str):
    """Yield check(), which refuses (CheckpointError) what the block read of `directory` if the directory was
    replaced since the block began (a save into it swapped a new directory in: files read by path before and
    after it hold two checkpoints); an error raised in the block meanwhile is refused so too."""
    version = directory_version(directory)

    def check():
        if directory_version(directory) != version:
            raise CheckpointError(f"{directory} was replaced while {doing} (another process saving into it?), and "
                                  "what was read of it may mix two checkpoints; run again when no save is in progress")
    try:
        yield check
    except Exception:
        check()
        raise
    check()


def _load_opened(directory: Path, cfg: LlamaConfig, location: dict, handles: dict, wanted, device) -> Llama:
    """load_pretrained's model, from the checkpoint's opened files."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {name: tuple(t.shape) for name, t in hf_tensors(model).items()}
    _check_index_points_right(directory, location, handles)
    found = {name: tuple(handles[file].get_slice(name).get_shape()) for name, file in location.items()}
    _check_names_and_shapes(directory, expected, found, tied=cfg.tie_word_embeddings,
                            unlisted=_unlisted_tensors(location, handles))
    if wanted is None:
        _check_one_matrix_dtype(directory, {name: handles[location[name]].get_slice(name) for name in expected})
    state = {}
    for name in expected:
        tensor = handles[location[name]].get_tensor(name)
        if not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
            raise CheckpointError(f"{directory}: tensor {name} has dtype {tensor.dtype}; expected fp32, bf16, fp16 "
                                  "or fp64")
        # a copy: as safetensors gives it, the tensor is a view of the file's memory map, which a rewrite in place
        # would change after the load (and a file cut short make a SIGBUS)
        converted = tensor.to(device=device, dtype=wanted or tensor.dtype, copy=True)
        check_finite_after_cast(tensor, converted, f"{directory}: tensor {name}")
        state[name[len("model."):] if name.startswith("model.") else name] = converted
    if cfg.tie_word_embeddings and "lm_head.weight" in location:  # a tied head saved anyway must be the embedding
        head = handles[location["lm_head.weight"]].get_tensor("lm_head.weight")
        if not torch.equal(head.to(state["embed_tokens.weight"]), state["embed_tokens.weight"]):
            raise tied_head_differs(directory)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.reset(device=torch.device(device))
    return model


def tied_head_differs(directory) -> CheckpointError:
    return CheckpointError(f"{directory}: config.json ties the head to the embedding (tie_word_embeddings=true), but "
                           "the checkpoint's lm_head.weight differs from model.embed_tokens.weight; set "
                           "tie_word_embeddings to false to load the head as saved, or drop lm_head.weight to tie it")


def checked_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name; None for "auto". Anything else is a ValueError."""
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name == "auto":
            return None
        if name not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use auto (the checkpoint's own), "
                             f"{', '.join(DTYPE_NAMES)} or a torch floating dtype")
        return DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or dtype not in _SAFETENSORS_DTYPES.values():
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16, torch.float16 or torch.float64 (or its name), "
                         f"got {dtype!r}: a LLaMA's weights are one of these (float8 weights cannot run the model)")
    return dtype


def _check_one_matrix_dtype(directory: Path, slices: dict) -> None:
    """Refuse, for dtype "auto", a checkpoint whose matrices (embedding, projections, head) are stored in several
    dtypes: the model computes in one (a bfloat16 activation meets a float32 head's weight), and which one to
    convert the others to is the caller's choice. Norms may differ: they compute in float32 whatever theirs."""
    dtypes: dict[str, str] = {}
    for name, piece in slices.items():
        if len(piece.get_shape()) > 1:
            dtypes.setdefault(piece.get_dtype(), name)
    if len(dtypes) > 1:
        raise CheckpointError(f"{directory}: the weight matrices are stored in several dtypes ("
                              + ", ".join(f"{dtype}: {name}" for dtype, name in dtypes.items())
                              + "), and the model computes in one; pass dtype= to convert them all")


def check_finite_after_cast(source: torch.Tensor, converted: torch.Tensor, what: str, error=CheckpointError) -> None:
    """Refuse (`error`) a conversion that made a finite weight infinite (1e5 in float16, whose largest is 65504)."""
    if converted.dtype == source.dtype or torch.finfo(converted.dtype).max >= torch.finfo(source.dtype).max:
        return
    if torch.isinf(converted).any():  # one reduction where it was converted; the source is looked at only then
        overflow = torch.isinf(converted).to(source.device) & torch.isfinite(source)
        if not overflow.any():
            return
        largest = source[overflow].abs().max().item()
        raise error(f"{what} holds {largest:g}, beyond {str(converted.dtype).removeprefix('torch.')}'s largest "
                    f"({torch.finfo(converted.dtype).max:g}): converting it makes it infinite; load it in a dtype that "
                    "holds it")


def tensor_locations(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the file holding it."""
    weight_map = sharded_weight_map(directory)
    if weight_map is not None:
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / WEIGHTS_NAME
    with _open_all({single}) as handles:
        return {name: single for name in handles[single].keys()}


class _open_all:
    """Open several safetensors files (memory-mapped), turning a corrupt file into a named error."""

    def __init__(self, files):
        self.files = sorted(files)

    def __enter__(self) -> dict:
        self.handles = {}
        for file in self.files:
            try:
                # safetensors reports a file it may not read as missing: open names the file and the real cause
                open(file, "rb").close()
            except OSError:
                self.__exit__(None, None, None)
                raise
            try:
                self.handles[file] = safe_open(str(file), framework="pt", device="cpu").__enter__()
            except (SafetensorError, OSError, ValueError) as err:
                self.__exit__(None, None, None)
                raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
        return self.handles

    def __exit__(self, *exc):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)


def _check_index_points_right(directory, location: dict, handles: dict) -> None:
    """Every tensor the index places in a shard is in that shard (an index edited by hand, or shards
    from another save, would otherwise fail deep inside safetensors)."""
    held = {file: set(handle.keys()) for file, handle in handles.items()}
    wrong = sorted(f"{name} (in {file.name}?)" for name, file in location.items() if name not in held[file])
    if wrong:
        raise CheckpointError(f"{directory / INDEX_NAME} places tensor(s) in shards that do not hold them: "
                              f"{listed(wrong, 8, ' ...')}")


def _unlisted_tensors(location: dict[str, Path], held: dict[Path, object]) -> list[tuple[str, Path, Path | None]]:
    """Tensors a shard holds where the index does not place them, as (name, shard, the shard the index places
    it in, or None where it lists no such name): reading by the index alone would leave them out without a word
    (a second copy of a tensor may hold other values). `held` maps each file to what lists its tensor names (a
    safetensors handle, a header dict). A single file's tensors all have a location, so it has none."""
    return [(name, file, location.get(name)) for file, tensors in held.items() for name in tensors.keys()
            if location.get(name) != file]


def _check_names_and_shapes(directory, expected: dict, found: dict, tied: bool, what: str | None = None,
                            unlisted: list[tuple[str, Path, Path | None]] = ()) -> None:
    """One error naming every missing, unexpected (including the `_unlisted_tensors` of a sharded
    checkpoint) and mis-shaped tensor."""
    problems = []
    found = {name: shape for name, shape in found.items() if not _IGNORED_RE.fullmatch(name)}
    unlisted = sorted((entry for entry in unlisted if not _IGNORED_RE.fullmatch(entry[0])), key=lambda e: e[:2])
    if tied and "lm_head.weight" in found:  # some tools save the tied head anyway: it must be the embedding
        if found.pop("lm_head.weight") != expected["model.embed_tokens.weight"]:
            problems.append("lm_head.weight has a different shape from the tied model.embed_tokens.weight")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected)) + [
        f"{name} (in {file.name}, but not in {INDEX_NAME})" if indexed is None else
        f"{name} (a second copy, in {file.name}; {INDEX_NAME} places it in {indexed.name})"
        for name, file, indexed in unlisted]
    misshaped = [f"{name} {list(found[name])} (expected {list(expected[name])})"
                 for name in sorted(set(expected) & set(found)) if found[name] != expected[name]]
    if missing and {name[len("model."):] for name in missing if name.startswith("model.")} & set(found):
        problems.append("the checkpoint's tensor names lack the `model.` prefix of the Hugging Face layout "
                        "(`embed_tokens.weight` for `model.embed_tokens.weight`): a raw state dict? kpro.save_pretrained "
                        "writes the layout kpro and Hugging Face read")
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensor(s): {', '.join(misshaped)}")
    if problems:
        raise CheckpointError((what or f"checkpoint {directory} does not match its config.json") + ":\n  "
                              + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------- save

def save_pretrained(model: Llama, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as an HF-layout checkpoint directory, atomically replacing any previous one.

    Files in an existing directory that are not part of the weights (a tokenizer, say) are kept, except
    convert-gguf's record (GGUF_RECORD), which would let a later conversion replace these weights. A model
    sharded with FSDP2 is gathered to rank 0, which writes it: then every process must call this.
    """
    if not isinstance(model, Llama):
        raise TypeError(f"save_pretrained() takes a kpro.Llama, got {type(model).__name__} (a Bitune or LoRA-adapted "
                        "model: save its adapters with save_adapters, or merge one adapter first)")
    max_shard_bytes = parse_size(max_shard_size)
    if distributed.is_sharded(model):
        return _save_sharded(model, Path(directory), max_shard_bytes)
    with atomic_directory(directory, drop=_replaced_by_a_save) as tmp:
        _write_checkpoint(model, tmp, max_shard_bytes)
    return Path(directory)


def _save_sharded(model: Llama, directory: Path, max_shard_bytes: int) -> Path:
    """save_pretrained of an FSDP2-sharded model: a collective; rank 0 writes, every rank learns the outcome."""
    env = distributed.current_env()
    state = distributed.full_model_state(model)  # every rank takes part; rank 0 gets the whole state

    def write():
        with atomic_directory(directory, drop=_replaced_by_a_save) as tmp:
            _write_checkpoint(model, tmp, max_shard_bytes, state)

    distributed.on_main(write, env, f"save {directory}")
    return directory


def _write_checkpoint(model: Llama, out: Path, max_shard_bytes: int, state_dict=None) -> None:
    """The HF-layout files of `model` (or of `state_dict`, a sharded model's gathered full state) in `out`."""
    tensors = checkpoint_tensors(model, state_dict)
    dtypes = {t.dtype for t in tensors.values()}
    hf_config = model.config.to_hf()
    if len(dtypes) == 1:
        hf_config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    _write_file(out / CONFIG_NAME, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _save_shard(tensors, shards[0], out / WEIGHTS_NAME)
        return
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(tensors, names, out / file)
        for name in names:
            weight_map[name] = file
            total += tensors[name].numel() * tensors[name].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_file(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _plan_shards(tensors: dict, max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def _save_shard(tensors: dict, names: list[str], path: Path) -> None:
    # One shard at a time on the CPU, so a GPU model is never copied to host memory whole.
    shard = {name: tensors[name].detach().to("cpu").contiguous() for name in names}
    save_safetensors(shard, path, metadata={"format": "pt"})


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)  # no unit: bytes
    if not match:
        raise ValueError(f"cannot read size {size!r}; use a byte count or a string like '5GB'")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    if number * scale < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return int(number * scale)


def is_weight_file(name: str) -> bool:
    return name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD_RE.fullmatch(name))


def _replaced_by_a_save(name: str) -> bool:
    """What save_pretrained does not carry over from the directory it replaces: the old weights, and convert-gguf's
    record (the directory no longer holds what was converted)."""
    return is_weight_file(name) or name == GGUF_RECORD


def _write_file(path: Path, content: str | bytes) -> None:
    with naming_write_failures(path):  # a full disk is seen as the file closes, and that error names no file
        if isinstance(content, bytes):
            Path(path).write_bytes(content)
        else:
            Path(path).write_text(content)


