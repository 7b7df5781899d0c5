"""A GGUF file converted once into an MLX directory in corral's cache:
`<cache>/gguf/<sha256 of the file>/` with `config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`, a `README.md` model card and
`corral-gguf.json` (the machine-readable card, written last: the entry is complete
when it is there and every file it lists has the size it lists).

Everything that can refuse the file (architecture, tensor types, tensor names, the
tokenizer) is decided before anything is written. The directory is built under a
staging name and renamed into place (see `cache`), so concurrent processes and a crash
mid-conversion never leave a half model; an incomplete entry is rebuilt. Hashing a
multi-GB file on every start would be slow, so `<cache>/gguf/index.json` remembers each
file's hash by (path, device, inode, size, mtime_ns); a file whose stat changed is hashed
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy.typing as npt
import structlog
from gguf import GGMLQuantizationType

from corral.engine.loaders.cache import cache_dir, publish, staging_dir
from corral.engine.loaders.errors import model_load_error
from corral.engine.loaders.gguf_arch import Architecture, architecture_of, qk_row_order
from corral.engine.loaders.gguf_file import GGUFModel, logical_shape, tensor_rows, tensor_type
from corral.engine.loaders.gguf_tokenizer import build_tokenizer, tokenizer_config
from corral.engine.loaders.gguf_weights import (
    GROUP_SIZE,
    Storage,
    convert_tensor,
    output_specs,
    storage_for,
)
from corral.engine.loaders.safetensors_out import SafetensorsWriter

__all__ = ["FORMAT_VERSION", "MARKER", "TensorPlan", "convert_gguf", "converted",
           "is_complete"]

# Bump when what this module writes changes: entries of another version are rebuilt.
FORMAT_VERSION = 1
MARKER = "corral-gguf.json"
_WEIGHTS = "model.safetensors"
_log = structlog.get_logger("corral.engine")


class TensorPlan(msgspec.Struct, frozen=True):
    """One GGUF tensor's way into the MLX model."""

    gguf_name: str
    hf_name: str
    gguf_type: str
    shape: tuple[int, ...]
    storage: Storage


class Card(msgspec.Struct, frozen=True):
    """`corral-gguf.json`: where the model came from and how its weights were stored."""

    format: int
    source: str
    sha256: str
    size: int
    architecture: str
    tensors: dict[str, str]  # gguf type -> how it is stored, for the reader
    files: dict[str, int]


def convert_gguf(path: Path, *, reference: str | None = None, sha256: str | None = None,
                 cache: Path | None = None) -> Path:
    """The MLX directory converted from the GGUF file at ``path``, converting it the
    first time (logged as `model.converting` / `model.converted` with the seconds).

    Args:
        reference: what the user named it by, for messages (default: ``path``).
        sha256: the file's SHA-256 when already known (an Ollama blob's digest);
            otherwise from the index, or hashed.
        cache: corral's cache directory (default: `cache_dir()`).

    Raises:
        EngineClientError: ModelLoadError, before anything is written, for a file
            corral cannot serve (naming the architecture, tensor type or tokenizer).
        OSError: the cache cannot be written.
    """
    reference = reference or str(path)
    root = (cache or cache_dir()) / "gguf"
    digest = sha256 or _content_hash(path, root)
    target = root / digest
    if is_complete(target):
        return target
    started = time.monotonic()
    _log.info("model.converting", path=reference, sha256=digest, target=str(target))
    model = GGUFModel(path, reference)
    arch = architecture_of(model)
    plans = _plan(model, arch)
    config = _config(model, arch, plans)
    tokenizer = build_tokenizer(model)
    staging = staging_dir(target)
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tokenizer_config(model))
        _write_json(staging / "config.json", config)
        _write_weights(staging / _WEIGHTS, model, arch, plans, config)
        card = _card(model, digest, arch, plans)
        (staging / "README.md").write_text(_card_text(card))
        files = {p.name: p.stat().st_size for p in staging.iterdir()}
        _write_json(staging / MARKER, msgspec.to_builtins(
            msgspec.structs.replace(card, files=files)))
        publish(staging, target, is_complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log.info("model.converted", path=reference, sha256=digest, target=str(target),
              architecture=arch.name, seconds=round(time.monotonic() - started, 3))
    return target


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished conversion of this format: its marker
    parses, and every file it lists is there with the size it lists."""
    try:
        card = msgspec.json.decode((directory / MARKER).read_bytes(), type=Card)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return False
    if card.format != FORMAT_VERSION:
        return False
    for name, size in card.files.items():
        try:
            if (directory / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _plan(model: GGUFModel, arch: Architecture) -> list[TensorPlan]:
    plans = []
    unsupported = set()
    for name, tensor in model.tensors.items():
        hf_name = arch.hf_name(model, name)
        if hf_name is None:
            continue
        kind = tensor_type(tensor)
        shape = logical_shape(tensor)
        storage = storage_for(kind, len(shape))
        if storage is None or (storage.kind == "affine" and shape[-1] % GROUP_SIZE):
            unsupported.add(kind.name)
            continue
        plans.append(TensorPlan(name, hf_name, kind.name, shape, storage))
    if unsupported:
        raise model_load_error(model.reference, f"{model.reference}: GGUF tensor type(s) "
                                                f"{', '.join(sorted(unsupported))} not "
                                                f"supported", tensor_types=sorted(unsupported))
    return plans


def _config(model: GGUFModel, arch: Architecture, plans: list[TensorPlan]) -> dict[str, Any]:
    """config.json, with `quantization` when any weight is quantized: the most common
    bit width as the default, and an entry for each module that differs from it (its own
    bits, or false for one that stays a plain array), as mlx_lm's loader reads them."""
    config = arch.config(model)
    matrices = [p for p in plans if len(p.shape) == 2]
    bits = [p.storage.bits for p in matrices if p.storage.kind == "affine"]
    if bits:
        default = max(set(bits), key=bits.count)
        overrides: dict[str, Any] = {}
        for plan in matrices:
            module = plan.hf_name.rsplit(".", 1)[0]
            if plan.storage.kind == "float":
                overrides[module] = False
            elif plan.storage.bits != default:
                overrides[module] = {"group_size": GROUP_SIZE, "bits": plan.storage.bits}
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": default, **overrides}
        config["quantization_config"] = config["quantization"]
    return config


def _write_weights(path: Path, model: GGUFModel, arch: Architecture,
                   plans: list[TensorPlan], config: dict[str, Any]) -> None:
    """model.safetensors, one tensor at a time (memory holds one tensor, not the model)."""
    specs = {}
    for plan in plans:
        stem = plan.hf_name.rsplit(".", 1)[0]
        for suffix, spec in output_specs(plan.storage, plan.shape).items():
            specs[plan.hf_name if suffix == "weight" else f"{stem}.{suffix}"] = spec
    with SafetensorsWriter(path, specs, {"format": "mlx"}) as writer:
        for name, array in _arrays(model, arch, plans, config):
            writer.write(name, array)


def _arrays(model: GGUFModel, arch: Architecture, plans: list[TensorPlan],
            config: dict[str, Any]) -> Iterator[tuple[str, npt.NDArray[Any]]]:
    heads = {f"self_attn.{proj}.{kind}": config[count]
             for proj, count in (("q_proj", "num_attention_heads"),
                                 ("k_proj", "num_key_value_heads"))
             for kind in ("weight", "bias")}
    for plan in plans:
        order = None
        if arch.permute_qk and (head := plan.hf_name.split(".", 3)[-1]) in heads:
            order = qk_row_order(plan.shape[0], heads[head])
        shift = arch.norm_shift if plan.hf_name.endswith("norm.weight") else 0.0
        tensor = model.tensors[plan.gguf_name]
        arrays = convert_tensor(tensor_rows(tensor), GGMLQuantizationType[plan.gguf_type],
                                plan.storage, row_order=order, shift=shift)
        stem = plan.hf_name.rsplit(".", 1)[0]
        for suffix, array in arrays.items():
            yield (plan.hf_name if suffix == "weight" else f"{stem}.{suffix}"), array


def _card(model: GGUFModel, digest: str, arch: Architecture, plans: list[TensorPlan]) -> Card:
    tensors: dict[str, str] = {}
    for plan in plans:
        storage = plan.storage
        if storage.kind == "float":
            how = f"{storage.dtype} array" + ("" if storage.exact else ", dequantized")
        else:
            how = (f"MLX affine {storage.bits}-bit, group {GROUP_SIZE}, "
                   + ("repacked exactly" if storage.exact else "dequantized and re-quantized"))
        tensors.setdefault(f"{plan.gguf_type} {len(plan.shape)}-D", how)
    return Card(format=FORMAT_VERSION, source=str(model.path), sha256=digest,
                size=model.path.stat().st_size, architecture=arch.name, tensors=tensors,
                files={})


def _card_text(card: Card) -> str:
    """README.md: the model card a person reads."""
    rows = "\n".join(f"| {kind} | {how} |" for kind, how in sorted(card.tensors.items()))
    return (f"---\nlibrary_name: mlx\npipeline_tag: text-generation\ntags: [mlx, gguf]\n"
            f"---\n\n# {Path(card.source).name} for MLX\n\n"
            f"Converted by corral from the GGUF file `{card.source}` "
            f"(SHA-256 `{card.sha256}`, {card.size} bytes), architecture "
            f"`{card.architecture}`. Tensor names follow mlx_lm's; llama's Q/K rows are "
            f"back in Hugging Face order and Gemma's norms are stored without the +1.\n\n"
            f"| GGUF tensors | stored as |\n|---|---|\n{rows}\n")


def converted(path: Path, *, cache: Path | None = None) -> Path | None:
    """The finished conversion of the GGUF file at ``path`` when there is one and the
    file's hash is known (the index's for the file as it is now); None when finding
    out would take hashing or converting. Reads a few small files only."""
    root = (cache or cache_dir()) / "gguf"
    digest = _index(path, root)[1]
    if digest is None:
        return None
    return root / digest if is_complete(root / digest) else None


def _index(path: Path, root: Path) -> tuple[dict[str, Any], str | None]:
    """The stat-keyed index, and the file's SHA-256 from it if the file is unchanged."""
    try:
        stat = path.stat()
    except OSError as error:
        raise model_load_error(str(path), f"cannot read {path}: {error.strerror}") from None
    try:
        index: dict[str, Any] = json.loads((root / "index.json").read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path.resolve()))
    identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]
    if isinstance(entry, dict) and entry.get("stat") == identity:
        return index, str(entry["sha256"])
    return index, None


def _content_hash(path: Path, root: Path) -> str:
    """The file's SHA-256, from the stat-keyed index when the file is unchanged, else
    hashed (and remembered)."""
    index, known = _index(path, root)
    if known is not None:
        return known
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    index[str(path.resolve())] = {
        "stat": [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns],
        "sha256": digest.hexdigest()}
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".index.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    partial.write_text(json.dumps(index, indent=1))
    os.replace(partial, root / "index.json")  # a concurrent writer may win: a lost entry
    return digest.hexdigest()                  # is hashed again next time


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
