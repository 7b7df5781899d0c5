"""Tiny GGUF files for the loader tests, written with llama.cpp's own writer (`gguf`):
each supported architecture with random weights in a chosen GGML type, a byte-level BPE
or a SentencePiece vocabulary, and the Hugging Face weights the conversion must give
back. Import it: `from synthetic_gguf import write_model`.

The weights are written the way llama.cpp's converter writes them: llama's Q and K rows
permuted (`llama_permute`), Gemma's norms stored plus one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import pre_tokenizers

HIDDEN, HEADS, KV_HEADS, FF, CONTEXT = 64, 4, 2, 128, 256
HEAD_DIM = {"llama": 16, "qwen2": 16, "qwen3": 32, "gemma3": 32}
# mlx_lm's gemma3 needs one global layer, the sixth.
LAYERS = {"llama": 2, "qwen2": 2, "qwen3": 2, "gemma3": 6}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPM_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<start_of_turn>' + "
                  "message['role'] + '\n' + message['content'] + '<end_of_turn>\n'}}"
                  "{% endfor %}")

Array = npt.NDArray[Any]
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_NORMS = {"ffn_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {"ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}


def hf_name(arch: str, gguf_name: str) -> str:
    """The Hugging Face (mlx_lm) name of a GGUF tensor, written out here independently
    of the loader, to check it."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, index, key, kind = gguf_name.split(".")
    names = {**_LAYER_NAMES, **(_GEMMA_NORMS if arch == "gemma3" else _NORMS)}
    return f"model.layers.{index}.{names[key]}.{kind}"


def llama_permute(weights: Array, n_head: int) -> Array:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: rotary halves to interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a small byte-level BPE: the specials, every
    byte, and a few merges ("Ġthe", "hello")."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "l l", "e ll", "h ell", "hell o", "Ġ Ġ"]
    merged = ["Ġt", "he", "Ġthe", "ll", "ell", "hell", "hello", "ĠĠ"]
    tokens = SPECIALS + alphabet + merged
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)), merges


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """Tokens, types and scores of a small SentencePiece vocabulary with byte fallback."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzH", "▁h", "he", "ll", "▁he", "llo", "▁hello",
              "▁w", "or", "▁wor", "ld", "▁world"]
    tokens = SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (len(SPM_SPECIALS) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def _shapes(arch: str, vocab: int, tied: bool) -> dict[str, tuple[int, ...]]:
    hd = HEAD_DIM[arch]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, HIDDEN),
                                          "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS[arch]):
        layer = {"attn_norm.weight": (HIDDEN,), "attn_q.weight": (HEADS * hd, HIDDEN),
                 "attn_k.weight": (KV_HEADS * hd, HIDDEN),
                 "attn_v.weight": (KV_HEADS * hd, HIDDEN),
                 "attn_output.weight": (HIDDEN, HEADS * hd), "ffn_gate.weight": (FF, HIDDEN),
                 "ffn_up.weight": (FF, HIDDEN), "ffn_down.weight": (HIDDEN, FF),
                 "ffn_norm.weight": (HIDDEN,)}
        if arch == "qwen2":
            layer.update({"attn_q.bias": (HEADS * hd,), "attn_k.bias": (KV_HEADS * hd,),
                          "attn_v.bias": (KV_HEADS * hd,)})
        if arch in ("qwen3", "gemma3"):
            layer.update({"attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,)})
        if arch == "gemma3":
            layer.update({"post_attention_norm.weight": (HIDDEN,),
                          "post_ffw_norm.weight": (HIDDEN,)})
        shapes.update({f"blk.{i}.{key}": shape for key, shape in layer.items()})
    return shapes


def write_model(path: Path, arch: str = "llama", *,
                qtype: GGMLQuantizationType = GGMLQuantizationType.F32, tied: bool = True,
                seed: int = 0, architecture: str | None = None,
                raw: dict[str, tuple[Array, GGMLQuantizationType]] | None = None,
                ) -> dict[str, Array]:
    """Write a tiny `arch` model to ``path``; return its weights as the GGUF holds them
    (float32, by GGUF name, before llama.cpp's permutation and norm shift: what the
    converted model must hold).

    Args:
        qtype: the type of every matrix (vectors stay F32).
        tied: leave out `output.weight`.
        architecture: the `general.architecture` to claim, if not `arch`.
        raw: tensors to write as given (bytes and type), in place of generated ones.
    """
    rng = np.random.default_rng(seed)
    spm = arch == "gemma3"
    tokens, types, extra = sentencepiece_vocab() if spm else byte_level_vocab()
    writer = GGUFWriter(path, architecture or arch)
    prefix = architecture or arch
    writer.add_uint32(f"{prefix}.context_length", CONTEXT)
    writer.add_uint32(f"{prefix}.embedding_length", HIDDEN)
    writer.add_uint32(f"{prefix}.block_count", LAYERS.get(arch, 2))
    writer.add_uint32(f"{prefix}.feed_forward_length", FF)
    writer.add_uint32(f"{prefix}.attention.head_count", HEADS)
    writer.add_uint32(f"{prefix}.attention.head_count_kv", KV_HEADS)
    writer.add_float32(f"{prefix}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{prefix}.rope.freq_base", 10000.0)
    if arch in ("qwen3", "gemma3"):
        writer.add_uint32(f"{prefix}.attention.key_length", HEAD_DIM[arch])
        writer.add_uint32(f"{prefix}.attention.value_length", HEAD_DIM[arch])
    if arch == "gemma3":
        writer.add_uint32(f"{prefix}.attention.sliding_window", 32)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(extra)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
        writer.add_chat_template(GEMMA_TEMPLATE)
    else:
        writer.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
        writer.add_token_merges(extra)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    expected: dict[str, Array] = {}
    for name, shape in _shapes(arch, len(tokens), tied).items():
        if raw and name in raw:
            data, kind = raw[name]
            writer.add_tensor(name, data, raw_dtype=kind)
            continue
        values = rng.normal(0, 0.5, size=shape).astype(np.float32)
        heads = {"attn_q.weight": HEADS, "attn_k.weight": KV_HEADS}.get(name.split(".", 2)[-1])
        permuted = arch == "llama" and heads is not None
        stored = llama_permute(values, heads) if permuted and heads else values
        if arch == "gemma3" and name.endswith("norm.weight"):
            stored = values + np.float32(1.0)
        if len(shape) == 2 and qtype != GGMLQuantizationType.F32:
            data = quantize(stored, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            values = dequantize(data, qtype)
            if permuted and heads:
                values = unpermute(values, heads)
        else:
            writer.add_tensor(name, stored)
        expected[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def unpermute(stored: Array, n_head: int) -> Array:
    """The Hugging Face rows of a permuted matrix (the inverse of `llama_permute`)."""
    return (stored.reshape(n_head, stored.shape[0] // n_head // 2, 2, *stored.shape[1:])
            .swapaxes(1, 2).reshape(stored.shape))
