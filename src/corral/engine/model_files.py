"""The checks a model directory passes before anything opens one of its files.

``mlx_lm.load`` opens whatever the directory holds, in C++ that keeps the GIL: a FIFO
named `model.safetensors` blocks the whole process (the event loop with it), a
`tokenizer.json` that is /dev/zero grows it until the machine runs out of memory, and a
config with `num_hidden_layers: 100000` builds gigabytes of layers before the weights
fail to match. So before the load, `check_model_files`:

- looks at every entry with `lstat` (and `stat` through a symlink), which never opens
  it: a FIFO, socket, device, or a symlink to one or to nothing, is refused;
- bounds the files a load parses whole: `config.json` to `CONFIG_MAX_BYTES`, every other
  `.json`, `.txt`, `.jinja`, `.model` or `.tiktoken` file (tokenizer, vocabulary, merges,
  generation config, chat template) to `TEXT_FILE_MAX_BYTES`;
- checks the config values that size the model against fixed maxima and against the
  bytes its safetensors hold.

It never opens anything but a bounded regular `config.json`, and never imports MLX.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Final

import msgspec

from corral.engine.loaders.errors import model_load_error
from corral.protocol.errors import EngineClientError

__all__ = [
    "CONFIG_MAX_BYTES",
    "TEXT_FILE_MAX_BYTES",
    "check_adapter",
    "check_model_files",
    "check_text_file",
]

CONFIG_MAX_BYTES: Final = 1 << 20
"""config.json: real ones are a few KiB; 1 MiB leaves room for long quantization maps."""

TEXT_FILE_MAX_BYTES: Final = 64 << 20
"""Tokenizer files and chat templates: the largest real tokenizer.json files (Gemma,
256k tokens) are about 35 MiB."""

_TEXT_SUFFIXES: Final = (".json", ".txt", ".jinja", ".model", ".tiktoken")

_MAXIMA: Final = {
    "num_hidden_layers": 4096,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "vocab_size": 1 << 23,
}
"""The config keys that size a model, with maxima far above any released model."""

_MIN_BITS_PER_PARAMETER: Final = 1
"""The weights must hold at least this many bits for each parameter the config implies
(a lower bound: each layer has a hidden_size x hidden_size projection or larger, the
embedding vocab_size x hidden_size). Quantized models store 2 bits or more."""


def check_model_files(directory: str) -> dict[str, Any]:
    """Check the model directory as the module docstring says, and return its config.

    Reads nothing but `config.json`, after its size; safe to call on any path, from any
    thread. Blocks only for the `lstat` calls and that one bounded read.

    Raises:
        EngineClientError: ModelLoadError (not retryable) naming the file that is not a
            regular file, is too large, or the config value that cannot be right.
    """
    weight_bytes, weight_files = 0, 0
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as error:
        raise model_load_error(directory, f"cannot list {directory}: {error}") from error
    for entry in entries:
        size = _regular_size(directory, entry.path)
        if size is None:
            continue  # a directory: mlx_lm reads none
        if entry.name == "config.json":
            _check_size(directory, entry.path, size, CONFIG_MAX_BYTES)
        elif entry.name.endswith(_TEXT_SUFFIXES):
            _check_size(directory, entry.path, size, TEXT_FILE_MAX_BYTES)
        elif entry.name.startswith("model") and entry.name.endswith(".safetensors"):
            weight_bytes += size
            weight_files += 1
    if not weight_files:  # in mlx_lm's words, before the config's sizes are weighed
        raise model_load_error(directory, f"No safetensors found in {directory}")
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, "rb") as file:
            config = msgspec.json.decode(file.read(CONFIG_MAX_BYTES + 1))
    except (OSError, msgspec.DecodeError) as error:
        raise model_load_error(directory, f"{config_path}: {error}",
                               file=config_path) from error
    if not isinstance(config, dict):
        raise model_load_error(directory, f"{config_path}: not a JSON object",
                               file=config_path)
    _check_sizing(directory, config_path, config, weight_bytes)
    return config


def check_text_file(path: str) -> bool:
    """Whether `path` is a regular file (through symlinks) of at most
    `TEXT_FILE_MAX_BYTES`, so reading it whole can neither block nor exhaust memory.
    False when nothing is there.

    Raises:
        EngineClientError: ModelLoadError naming `path` when something is there but it
            is not such a file.
    """
    if not os.path.lexists(path):
        return False
    size = _regular_size(path, path)
    if size is None:
        raise model_load_error(path, f"{path} is a directory, not a file", file=path)
    _check_size(path, path, size, TEXT_FILE_MAX_BYTES)
    return True


def check_adapter(directory: str) -> None:
    """Check a LoRA adapter directory as mlx_lm's loader reads it: a bounded regular
    `adapter_config.json` and a regular `adapters.safetensors`, nothing opened.

    Raises:
        EngineClientError: ModelLoadError (not retryable) naming the directory, or the
            file that is missing or not a regular file.
    """
    if not os.path.isdir(directory):
        raise model_load_error(directory, f"adapter_path: {directory} is not a directory",
                               field="adapter_path")
    config = os.path.join(directory, "adapter_config.json")
    weights = os.path.join(directory, "adapters.safetensors")
    if not check_text_file(config):
        raise model_load_error(directory, f"adapter_path: {directory} has no "
                               "adapter_config.json", field="adapter_path", file=config)
    if not os.path.lexists(weights) or _regular_size(directory, weights) is None:
        raise model_load_error(directory, f"adapter_path: {directory} has no "
                               "adapters.safetensors", field="adapter_path", file=weights)


def _regular_size(reference: str, path: str) -> int | None:
    """The size of the regular file at `path` (after symlinks), None for a directory."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            info = os.stat(path)  # never opens the target
    except FileNotFoundError:
        raise model_load_error(reference, f"{path} is a symlink to nothing",
                               file=path) from None
    except OSError as error:
        raise model_load_error(reference, f"{path}: {error}", file=path) from error
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        raise model_load_error(reference, f"{path} is a {_kind(info.st_mode)}, not a regular "
                                          f"file: corral reads models from regular files "
                                          f"only", file=path)
    return info.st_size


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _check_size(reference: str, path: str, size: int, limit: int) -> None:
    if size > limit:
        raise model_load_error(reference, f"{path} has {size} bytes, more than the "
                                          f"{limit} corral reads for such a file",
                               file=path, size=size, limit=limit)


def _check_sizing(reference: str, config_path: str, config: dict[str, Any],
                  weight_bytes: int) -> None:
    """The sizing values (top level, or `text_config` for multimodal models) are
    integers in range, and imply no more parameters than the weights can hold."""
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key, maximum in _MAXIMA.items():
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 1 <= value <= maximum:
                raise _bad_value(reference, config_path, f"{key}: {value!r} is not an "
                                                         f"integer in [1, {maximum}]", key)
        layers, hidden = section.get("num_hidden_layers"), section.get("hidden_size")
        vocab = section.get("vocab_size")
        if not isinstance(layers, int) or not isinstance(hidden, int):
            continue
        parameters = layers * hidden * hidden + (vocab if isinstance(vocab, int) else 0) * hidden
        if parameters * _MIN_BITS_PER_PARAMETER > weight_bytes * 8:
            raise _bad_value(reference, config_path,
                             f"num_hidden_layers {layers} and hidden_size {hidden} imply at "
                             f"least {parameters} parameters, more than the {weight_bytes} "
                             f"bytes of model*.safetensors hold", "num_hidden_layers")


def _bad_value(reference: str, config_path: str, message: str,
               key: str) -> EngineClientError:
    return model_load_error(reference, f"{config_path}: {message}", file=config_path,
                            field=key)
