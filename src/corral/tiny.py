"""Make corral's tiny offline model: a random llama with a locally trained tokenizer.

The model is what corral serves when no model is configured, and what its tests and
benchmarks load: `mlx_lm.load` reads it like any converted checkpoint, yet it is a few
hundred kilobytes and is built from nothing but this module, so no test ever needs the
network or a model download. The same seed gives byte-identical files on every run.

This module must never touch the network, never change process-wide state (environment
variables, MLX's default device or stream, MLX's or numpy's global random state), and
never leave a half written model where a complete one is expected.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import numpy.typing as npt
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from corral.engine.loaders import cache_dir

__all__ = ["default_model_path", "make_tiny_model"]

# Bump when the files this module writes change, so caches of the old model are not
# mistaken for the new one.
_FORMAT_VERSION = 2
_DEFAULT_NAME = f"tiny-model-v{_FORMAT_VERSION}"

_BOS = "<|bos|>"
_EOS = "<|eos|>"
_SYSTEM = "<|system|>"
_USER = "<|user|>"
_ASSISTANT = "<|assistant|>"
# Listed first so the trainer gives them ids 0..4 in this order.
_SPECIAL_TOKENS = (_BOS, _EOS, _SYSTEM, _USER, _ASSISTANT)
# Tool-call markers, as Qwen 2.5 and Hermes have them: added after training, as single
# tokens that decode to their text, so mlx_lm's `json_tools` parser reads the calls.
_TOOL_CALL_START = "<tool_call>"
_TOOL_CALL_END = "</tool_call>"

# An upper bound: the corpus runs out of pairs seen twice before it, at 592 tokens.
_VOCAB_SIZE = 1024
_MAX_POSITIONS = 2048
# See `_write_weights`: the bias channel's value in every embedding, and the bonus or
# penalty per unit of it that the output layer gives each token.
_BIAS_CHANNEL_VALUE = 4.0
_LOGIT_BIAS = 8.0
_EOS_LOGIT_BIAS = 10.5

_WEIGHTS = "model.safetensors"
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", _WEIGHTS)
# Written last: its presence means every other file is complete.
_MARKER = "corral-tiny-model.json"

# A turn is its role token, the text, then <|eos|>, so a reply ends where a model
# trained on this format would stop. The BOS is in the template because mlx_lm encodes
# a rendered prompt that starts with it without adding special tokens again.
# Tools render as Qwen 2.5's template renders them: their JSON in the system turn, with
# the call format; an assistant's calls as <tool_call> JSON </tool_call>; a tool's
# answer as a user turn in <tool_response> tags. Without tools the text is as before.
_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set turns = messages -%}"
    "{%- if tools -%}"
    "{{- '<|system|>' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\n\n' -}}{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{{- '# Tools\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\n</tools>\nTo call a function, answer <tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>'"
    " + eos_token -}}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|user|><tool_response>\n' + message['content'] + '\n</tool_response>'"
    " + eos_token -}}"
    "{%- elif message['role'] in ['system', 'user', 'assistant'] -%}"
    "{{- '<|' + message['role'] + '|>' + (message['content'] or '') -}}"
    "{%- for tool_call in message.get('tool_calls') or [] -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}"
    "{%- endif -%}"
    "{{- '<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": '"
    " + (tool_call.arguments | tojson) + '}\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('tiny model chat roles are system, user, assistant and tool') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

# The tokenizer's training text. Varied, plain English so that common words and
# word pieces become single tokens, as in a real tokenizer.
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the gate.
A river runs through the valley, and in spring the water is cold and clear.
She opened the window, looked at the rain, and decided to stay home and read a book.
Every morning he walks to the station, buys a newspaper, and waits for the train.
The library closes at six o'clock on weekdays and at noon on Saturdays.
Please send the report by Friday so that we can review it before the meeting.
Our team finished the project two weeks early, which surprised everyone in the office.
The children built a castle of sand on the beach and watched the waves destroy it.
In the winter the mountains are covered with snow, and the roads are often closed.
He asked whether the museum was open on Mondays, but nobody knew the answer.
The recipe calls for three eggs, two cups of flour, and a pinch of salt.
When the music started, the whole room began to dance and sing along.
Scientists measured the temperature of the ocean at many depths over ten years.
The old bridge was repaired last summer, and now trucks can cross it again.
I think we should leave early tomorrow, because the traffic is terrible after eight.
The cat slept on the warm stones in the garden until the sun went down.
Could you tell me how to get to the nearest post office from here?
They planted apple trees along the fence, hoping for fruit in a few years.
The computer restarted after the update, and all of the files were still there.
Good writing is clear, simple, and honest, and it respects the reader's time.
A small boat sailed slowly across the harbor as the fog lifted in the morning.
The doctor said that rest, water, and sleep would help more than any medicine.
We counted the stars one night: one, two, three, four, five, and then many more.
Her grandmother told stories about the village where she grew up long ago.
The price of bread went up again, so the bakery started selling smaller loaves.
On the first day of school the students were nervous, but the teacher was kind.
If the server does not answer within a few seconds, the client should try again.
The engine failed, the pilot landed safely, and the passengers clapped with relief.
Birds sang in the trees, bees moved between the flowers, and the day was bright.
He wrote a letter to his friend, folded it twice, and put it in an envelope.
The market was full of people buying fish, vegetables, cheese, and fresh herbs.
After the storm, the streets were quiet and the air smelled of wet earth.
Learning a new language takes patience, practice, and a lot of listening.
The painting shows a woman reading by a window, with light falling on the page.
What time does the concert begin, and how long will it last?
The company hired five new engineers to build a faster and safer system.
At night the city lights reflect on the river like thousands of small candles.
My brother likes to cook on Sundays, and he always makes too much soup.
The hikers followed the trail north, crossed a stream, and reached the lake by noon.
Questions are welcome at any time; answers may take a little longer.
The garden needs water every evening during the hottest weeks of the year.
She learned to play the piano at seven and gave her first concert at twelve.
A good plan today is better than a perfect plan next week.
The train was late, so we drank coffee and talked about our summer holidays.
Many people believe that kindness is the most important thing a person can learn.
The wind blew the leaves across the road, and the trees bent toward the east.
He fixed the broken chair with glue, two nails, and a great deal of care.
The teacher asked the class to write a short story about a journey by sea.
Yesterday it rained all day, but today the sky is blue and the air is warm.
The shop on the corner sells maps, books, pens, paper, and postcards.
"""


def make_tiny_model(directory: str | os.PathLike[str], *, seed: int = 0,
                    context: int = _MAX_POSITIONS) -> Path:
    """Write the tiny model into ``directory``, unless a complete one is already there.

    The files are ``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and
    ``model.safetensors``, plus a marker file written last. They are built in a
    temporary directory next to ``directory`` and moved into place by rename, so a
    crash leaves either no model or a complete one, and of two processes making the
    same directory at once, one keeps its copy and the other discards its own.

    Args:
        directory: where the model goes. Created, with its parents, if missing; if it
            exists, files of other names in it are left alone.
        seed: seeds the weights. The same seed gives byte-identical files.
        context: the model's context length (`max_position_embeddings`); RoPE has no
            learned positions, so any length works.

    Returns:
        ``directory`` as an absolute path, ready for ``mlx_lm.load``.

    Raises:
        OSError: if the directory or its parent cannot be written.
    """
    target = Path(directory).expanduser().absolute()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0o700 would outlive the rename, while os.mkdir
    # gives the directory the permissions the user's umask asks for.
    staging = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        _write_model(staging, seed, context)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_model_path() -> Path:
    """Return the directory of the embedded default model, making it on first use.

    The directory is ``tiny-model-v2`` under ``$CORRAL_CACHE_DIR`` if that is set, else
    under ``$XDG_CACHE_HOME/corral``, else under ``~/.cache/corral``. Processes may call
    this concurrently: each either finds the complete model or builds one, and only one
    build is kept.

    Returns:
        The absolute path of the model directory, ready for ``mlx_lm.load``.

    Raises:
        OSError: if the cache directory cannot be written.
    """
    return make_tiny_model(cache_dir() / _DEFAULT_NAME)


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a model that `_publish` finished putting there."""
    return (directory / _MARKER).is_file()


def _write_model(directory: Path, seed: int, context: int) -> None:
    """Write every model file and then the marker into the empty ``directory``."""
    tokenizer = _train_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = _model_config(tokenizer.get_vocab_size(), context)
    _write_json(directory / "config.json", config)
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(context))
    _write_weights(directory / _WEIGHTS, config, tokenizer, seed)
    _write_json(directory / _MARKER, {"format": _FORMAT_VERSION, "seed": seed})
    for name in (*_MODEL_FILES, _MARKER):
        _fsync_path(directory / name)
    _fsync_path(directory)


def _publish(staging: Path, target: Path) -> None:
    """Move the complete model in ``staging`` to ``target``.

    Renaming the whole directory is atomic and also replaces an empty ``target``. A
    ``target`` with files in it either already holds a model, put there by a process
    that won a race, or holds other files; in the latter case each file is replaced on
    its own and the marker last, so the model only counts as complete once it is.
    """
    try:
        os.rename(staging, target)
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _is_complete(target):
        return
    for name in (*_MODEL_FILES, _MARKER):
        os.replace(staging / name, target / name)
    _fsync_path(target)


def _train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE tokenizer on `_CORPUS`, deterministically."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        # Every byte gets a token, so any text encodes even if the corpus lacks it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_tokens([AddedToken(_TOOL_CALL_START, special=False, normalized=False),
                          AddedToken(_TOOL_CALL_END, special=False, normalized=False)])
    bos_id = tokenizer.token_to_id(_BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A",
        pair=f"{_BOS} $A {_BOS} $B",
        special_tokens=[(_BOS, bos_id)],
    )
    return tokenizer


def _tokenizer_config(context: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that lets transformers load ``tokenizer.json``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _BOS,
        "eos_token": _EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "chat_template": _CHAT_TEMPLATE,
    }


def _model_config(vocab_size: int, context: int) -> dict[str, Any]:
    """The llama ``config.json``, with the smallest dimensions that use every layer."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": vocab_size,
        "max_position_embeddings": context,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": _SPECIAL_TOKENS.index(_BOS),
        "eos_token_id": _SPECIAL_TOKENS.index(_EOS),
        "torch_dtype": "float32",
    }


def _write_weights(
    path: Path, config: dict[str, Any], tokenizer: Tokenizer, seed: int
) -> None:
    """Save random weights with the names and shapes mlx_lm's llama expects.

    The values come from numpy's generator seeded with ``seed``, not from MLX's global
    random state, drawn in sorted name order, so they are the same on every run.

    Embeddings and the output layer are drawn far wider than a trained model's (std 1
    rather than 0.02): at the usual scale every position's logits are nearly the same
    and greedy decoding repeats one token, while here the next token depends on the
    context and the text varies. Norm scales are one, as in a fresh llama.

    Residual channel 0 is a bias channel, so that the text is readable: every embedding
    holds the same positive value there and no layer writes to it, so the output
    layer's column 0 adds a fixed amount to each token's logit. Tokens that decode to
    printable ASCII or a newline get a large bonus; control bytes, bytes of multi-byte
    characters and the special tokens as large a penalty, so greedy decoding never
    picks them. EOS gets a slightly larger bonus than the readable tokens, so that a
    few replies end on their own, as a real model's do: with seed 0, 3 of 200 greedy
    runs from prompts taken from the corpus end with EOS within 64 tokens.
    """
    shapes = _parameter_shapes(config)
    rng = np.random.default_rng(seed)
    weights: dict[str, npt.NDArray[np.float32]] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=np.float32)
            continue
        wide = name in ("model.embed_tokens.weight", "lm_head.weight")
        std = 1.0 if wide else shape[-1] ** -0.5
        weights[name] = rng.normal(0.0, std, size=shape).astype(np.float32)

    weights["model.embed_tokens.weight"][:, 0] = _BIAS_CHANNEL_VALUE
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name][0, :] = 0.0
    readable = np.array(
        [_is_readable(tokenizer.decode([i])) for i in range(config["vocab_size"])]
    )
    weights["lm_head.weight"][:, 0] = np.where(readable, _LOGIT_BIAS, -_LOGIT_BIAS)
    weights["lm_head.weight"][tokenizer.token_to_id(_EOS), 0] = _EOS_LOGIT_BIAS

    arrays = {name: mx.array(value) for name, value in weights.items()}
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})


def _parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter of mlx_lm's llama for ``config``, under the name mlx_lm loads.

    Written out rather than read from an `mlx_lm.models.llama.Model`, because building
    one draws its initial weights from MLX's global random state, which this module
    must not advance. `mlx_lm.load` checks names and shapes strictly, and the tests
    compare them with mlx_lm's model.
    """
    hidden = config["hidden_size"]
    intermediate = config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    query = config["num_attention_heads"] * head_dim
    key_value = config["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (config["vocab_size"], hidden),
    }
    for index in range(config["num_hidden_layers"]):
        layer = f"model.layers.{index}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (query, hidden),
            f"{layer}.self_attn.k_proj.weight": (key_value, hidden),
            f"{layer}.self_attn.v_proj.weight": (key_value, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, query),
            f"{layer}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{layer}.mlp.up_proj.weight": (intermediate, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, intermediate),
        }
    return shapes


def _is_readable(text: str) -> bool:
    """Whether a token's text is non-empty printable ASCII, newlines allowed."""
    return bool(text) and all(
        (c.isascii() and c.isprintable()) or c == "\n" for c in text
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as stable, human-readable JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_path(path: Path) -> None:
    """Flush a file or directory to disk, so a later rename cannot outrun its data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
