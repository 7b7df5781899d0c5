"""The architectures corral reads from GGUF: llama, qwen2, qwen3 and gemma3. For each,
the mlx_lm `config.json` built from llama.cpp's metadata keys, the name each GGUF tensor
takes in mlx_lm's model, and what llama.cpp's converter did to the weights that must be
undone (the rows of llama's Q and K, Gemma's norms stored plus one).

Nothing here reads tensor data except llama's small `rope_freqs`; an architecture or a
tensor that has no place in the model is refused, by name, before anything is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from corral.engine.loaders.errors import model_load_error
from corral.engine.loaders.gguf_file import GGUFModel, logical_shape, tensor_rows, tensor_type
from corral.engine.loaders.gguf_weights import convert_tensor, storage_for

__all__ = ["ARCHITECTURES", "Architecture", "architecture_of", "qk_row_order"]

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
        "output": "lm_head"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA3_LAYER = {**_LAYER, **_QK_NORM, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
# Tensors of a multimodal GGUF (Ollama keeps vision towers in the model blob) and
# llama's rope_freqs, which becomes `rope_scaling` instead of a weight.
_NOT_WEIGHTS = re.compile(r"^(v|mm|a|enc)\.|^rope_freqs\.weight$")
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")


class Architecture(msgspec.Struct, frozen=True):
    """How one GGUF architecture becomes an mlx_lm model.

    `permute_qk`: llama.cpp's converter reorders the rows of llama's Q and K
    projections for its interleaved rotary embedding (`LlamaModel.permute`); mlx_lm
    rotates halves, so the order is undone. `norm_shift`: added to every norm weight
    (Gemma stores `1 + w`, mlx_lm adds the one itself).
    """

    name: str
    model_type: str
    hf_class: str
    layer_names: dict[str, str]
    permute_qk: bool = False
    norm_shift: float = 0.0

    def hf_name(self, model: GGUFModel, gguf_name: str) -> str | None:
        """The mlx_lm parameter name of a GGUF tensor, or None for one that is not a
        weight of the text model.

        Raises:
            EngineClientError: ModelLoadError for a tensor with no place in the model.
        """
        if _NOT_WEIGHTS.match(gguf_name):
            return None
        if block := _BLOCK.match(gguf_name):
            index, key, kind = block.groups()
            if key in self.layer_names:
                return f"model.layers.{index}.{self.layer_names[key]}.{kind}"
        elif (top := _GLOBAL.match(gguf_name)) and top.group(1) in _TOP:
            return f"{_TOP[top.group(1)]}.{top.group(2)}"
        raise model_load_error(model.reference, f"{model.reference}: tensor {gguf_name} has "
                                                f"no place in a {self.name} model",
                               tensor=gguf_name)

    def config(self, model: GGUFModel) -> dict[str, Any]:
        """The mlx_lm `config.json` (without `quantization`, which the weights decide)."""
        return _CONFIGS[self.name](model)


ARCHITECTURES = {
    "llama": Architecture("llama", "llama", "LlamaForCausalLM", _LAYER, permute_qk=True),
    "qwen2": Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", _LAYER),
    "qwen3": Architecture("qwen3", "qwen3", "Qwen3ForCausalLM", {**_LAYER, **_QK_NORM}),
    "gemma3": Architecture("gemma3", "gemma3_text", "Gemma3ForCausalLM", _GEMMA3_LAYER,
                           norm_shift=-1.0),
}


def architecture_of(model: GGUFModel) -> Architecture:
    """The model's architecture.

    Raises:
        EngineClientError: ModelLoadError naming an architecture corral cannot serve.
    """
    arch = ARCHITECTURES.get(model.architecture)
    if arch is None:
        raise model_load_error(model.reference,
                               f"{model.reference}: GGUF architecture {model.architecture!r} "
                               f"is not supported (supported: {', '.join(ARCHITECTURES)})",
                               architecture=model.architecture)
    return arch


def qk_row_order(rows: int, heads: int) -> npt.NDArray[np.intp]:
    """The row order that undoes llama.cpp's `permute(w, n_head)` of a (rows, in) Q or
    K projection: within each head it stored the Hugging Face row `j * half + i` (the
    two halves that mlx_lm rotates together) at row `2i + j` (interleaved pairs), so the
    Hugging Face row `j * half + i` is taken from there."""
    head_dim = rows // heads
    order = np.arange(rows).reshape(heads, head_dim // 2, 2).swapaxes(1, 2)
    return order.reshape(-1)


# -- config.json ------------------------------------------------------------------------


def _common(model: GGUFModel, model_type: str, hf_class: str, *, theta: float,
            eps: float | None = None) -> dict[str, Any]:
    """The keys every architecture shares; `theta` and `eps` are the defaults of
    `rope.freq_base` and of the norm epsilon (required when None)."""
    heads = int(model.arch_value("attention.head_count"))
    hidden = int(model.arch_value("embedding_length"))
    embed = model.tensors.get("token_embd.weight")
    if embed is None:
        raise model_load_error(model.reference, f"{model.reference} has no token_embd.weight")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden,
        "num_hidden_layers": int(model.arch_value("block_count")),
        "intermediate_size": _one_value(model, "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _one_value(model, "attention.head_count_kv", heads),
        "head_dim": int(model.arch_value("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(model.arch_value("attention.layer_norm_rms_epsilon",
                                               *([] if eps is None else [eps]))),
        "rope_theta": float(model.arch_value("rope.freq_base", theta)),
        "vocab_size": logical_shape(embed)[0],
        "max_position_embeddings": int(model.arch_value("context_length")),
        "tie_word_embeddings": "output.weight" not in model.tensors,
    }
    if (scaling := _rope_scaling(model)) is not None:
        config["rope_scaling"] = scaling
    for key in ("bos_token_id", "eos_token_id"):
        if (token := model.value(f"tokenizer.ggml.{key}", None)) is not None:
            config[key] = int(token)
    ends = [model.value(f"tokenizer.ggml.{key}", None)
            for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    if len(found := sorted({int(t) for t in ends if t is not None})) > 1:
        config["eos_token_id"] = found  # mlx_lm stops at any of them
    return config


def _llama(model: GGUFModel) -> dict[str, Any]:
    config = _common(model, "llama", "LlamaForCausalLM", theta=10000.0)
    config["attention_bias"] = "blk.0.attn_q.bias" in model.tensors
    config["mlp_bias"] = "blk.0.ffn_up.bias" in model.tensors
    return config


def _qwen(model_type: str, hf_class: str) -> Callable[[GGUFModel], dict[str, Any]]:
    def build(model: GGUFModel) -> dict[str, Any]:
        config = _common(model, model_type, hf_class, theta=1_000_000.0)
        if model_type == "qwen2" and config["head_dim"] * config["num_attention_heads"] \
                != config["hidden_size"]:
            raise model_load_error(model.reference, f"{model.reference}: a qwen2 model "
                                                    f"whose head_dim is not hidden/heads")
        return config
    return build


def _gemma3(model: GGUFModel) -> dict[str, Any]:
    config = _common(model, "gemma3_text", "Gemma3ForCausalLM", theta=1_000_000.0, eps=1e-6)
    # llama.cpp's gemma3: the 27B (62 layers) scales queries by hidden/heads, the
    # others by head_dim; local layers use base 10000; one global layer in six.
    scalar = config["hidden_size"] // config["num_attention_heads"] \
        if config["num_hidden_layers"] == 62 else config["head_dim"]
    config.update(query_pre_attn_scalar=scalar, rope_local_base_freq=10000.0,
                  sliding_window_pattern=6,
                  sliding_window=int(model.arch_value("attention.sliding_window", 512)))
    return config


_CONFIGS: dict[str, Callable[[GGUFModel], dict[str, Any]]] = {
    "llama": _llama, "qwen2": _qwen("qwen2", "Qwen2ForCausalLM"),
    "qwen3": _qwen("qwen3", "Qwen3ForCausalLM"), "gemma3": _gemma3,
}


def _one_value(model: GGUFModel, suffix: str, default: Any = None) -> int:
    """A per-model count that llama.cpp may also store per layer (a list)."""
    value = model.arch_value(suffix) if default is None else model.arch_value(suffix, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise model_load_error(model.reference, f"{model.reference}: {suffix} differs "
                                                    f"between layers, which mlx_lm's "
                                                    f"{model.architecture} cannot hold")
        value = value[0]
    return int(value)


def _rope_scaling(model: GGUFModel) -> dict[str, Any] | None:
    """`rope_scaling` from `rope.scaling.*` keys, or from llama 3's `rope_freqs`."""
    kind = model.arch_value("rope.scaling.type", None)
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(model.arch_value("rope.scaling.factor"))}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": float(model.arch_value("rope.scaling.factor")),
                "original_max_position_embeddings":
                    int(model.arch_value("rope.scaling.original_context_length"))}
    if kind not in (None, "none"):
        raise model_load_error(model.reference, f"{model.reference}: rope scaling {kind!r} "
                                                f"is not supported")
    freqs = model.tensors.get("rope_freqs.weight")
    return None if freqs is None else _llama3_scaling(model, freqs)


def _llama3_scaling(model: GGUFModel, freqs: Any) -> dict[str, Any] | None:
    """Llama 3.1's rope scaling, which llama.cpp stores only as per-frequency factors:
    the factor is their largest, and the other parameters are Meta's (low 1, high 4,
    original context 8192), checked against every stored factor."""
    kind = tensor_type(freqs)
    storage = storage_for(kind, 1)
    if storage is None:
        raise model_load_error(model.reference, f"{model.reference}: rope_freqs of type "
                                                f"{kind.name}")
    stored = convert_tensor(tensor_rows(freqs), kind, storage)["weight"].astype(np.float64)
    factor = float(stored.max())
    if factor == 1.0:
        return None
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    theta = float(model.arch_value("rope.freq_base", 10000.0))
    dim = 2 * stored.size
    expected = []
    for i in range(stored.size):
        wavelen = 2 * math.pi * theta ** (2 * i / dim)
        if wavelen < 8192 / 4.0:
            expected.append(1.0)
        elif wavelen > 8192 / 1.0:
            expected.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    if not np.allclose(stored, expected, rtol=1e-3):
        raise model_load_error(model.reference, f"{model.reference}: rope_freqs that are "
                                                f"not llama 3's rope scaling")
    return params
