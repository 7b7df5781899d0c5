"""The tokenizer a GGUF file describes, as the `tokenizer.json` and
`tokenizer_config.json` that transformers (and so mlx_lm) load.

`tokenizer.ggml.model` says which: `gpt2` is byte-level BPE with the file's merges and
the pre-tokenizer `tokenizer.ggml.pre` names (the split llama.cpp applies, as Hugging
Face writes it); `llama` is SentencePiece BPE with byte fallback, whose merges follow
from the tokens' scores. Control tokens become special added tokens and user-defined
ones plain added tokens, so each marker of the chat template (`<|im_start|>`) is one id;
BOS/EOS follow `tokenizer.ggml.add_bos_token` / `add_eos_token`, defaulting as llama.cpp
does. An unknown tokenizer or pre-tokenizer is refused by name: a near miss would
tokenize differently from what the model learned, silently.
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from corral.engine.loaders.errors import model_load_error
from corral.engine.loaders.gguf_file import GGUFModel

__all__ = ["build_tokenizer", "tokenizer_config"]

_CONTROL, _USER_DEFINED = 3, 4

# The splits of llama.cpp's llama-vocab.cpp, as the models' tokenizer.json write them.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
          r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_NAMES = ("default", "gpt-2", "gpt2", "phi-2", "olmo", "mpt", "jais", "trillion",
               "granite-docling", "exaone4", "a.x-4.0", "mellum", "gigachat", "roberta-bpe")
_DIGITS_NAMES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                 "minerva-7b")
# name -> (split regex or None for GPT-2's, ignore_merges, add_bos default, NFC)
_PRE: dict[str, tuple[str | None, bool, bool, bool]] = {
    **{name: (None, False, False, False) for name in _GPT2_NAMES + _DIGITS_NAMES},
    **{name: (_LLAMA3, True, True, False) for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
        "lfm2")},
    "dbrx": (_LLAMA3, False, False, False), "smaug-bpe": (_LLAMA3, False, False, False),
    **{name: (_QWEN2, False, False, True) for name in (
        "qwen2", "qwen2.5", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan")},
    "gpt-4o": (_GPT4O, False, False, False), "llama4": (_GPT4O, False, False, False),
    "tekken": (_TEKKEN, True, True, False),
}


def build_tokenizer(model: GGUFModel) -> Tokenizer:
    """The file's tokenizer, ready to `save` as `tokenizer.json`.

    Raises:
        EngineClientError: ModelLoadError for a tokenizer or pre-tokenizer corral does
            not know.
    """
    kind = model.value("tokenizer.ggml.model")
    tokens: list[str] = _unique(model.value("tokenizer.ggml.tokens"))
    types: list[int] = model.value("tokenizer.ggml.token_type", [1] * len(tokens))
    if kind == "gpt2":
        tokenizer = _byte_level(model, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece(model, tokens, types)
    else:
        raise model_load_error(model.reference, f"{model.reference}: tokenizer {kind!r} is "
                                                f"not supported (supported: gpt2, llama)")
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind_ in zip(tokens, types, strict=True) if kind_ == _CONTROL]
    template = model.value("tokenizer.chat_template", "")
    marked = {t.content for t in special}
    special.extend(AddedToken(marker, special=True, normalized=False)
                   for marker in dict.fromkeys(re.findall(r"<[^<>\s]{1,64}>", template))
                   if marker not in marked and tokenizer.token_to_id(marker) is not None)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind_ in zip(tokens, types, strict=True)
                          if kind_ == _USER_DEFINED])
    bos, eos = _ends(model, tokens)
    add_bos, add_eos = _adds(model)
    ends = [t for t, add in ((bos, add_bos), (eos, add_eos)) if add and t is not None]
    if ends:
        first = f"{bos} " if add_bos and bos else ""
        last = f" {eos}" if add_eos and eos else ""
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{first}$A{last}", pair=f"{first}$A{last} {first}$B{last}",
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(ends)])
    return tokenizer


def tokenizer_config(model: GGUFModel) -> dict[str, Any]:
    """The `tokenizer_config.json`: special tokens, BOS/EOS flags, the chat template."""
    tokens: list[str] = _unique(model.value("tokenizer.ggml.tokens"))
    bos, eos = _ends(model, tokens)
    add_bos, add_eos = _adds(model)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos,
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model.arch_value("context_length", 2048)),
    }
    for name, key in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if (index := model.value(f"tokenizer.ggml.{key}", None)) is not None \
                and 0 <= int(index) < len(tokens):
            config[name] = tokens[int(index)]
    if template := model.value("tokenizer.chat_template", None):
        config["chat_template"] = template
    return config


def _byte_level(model: GGUFModel, tokens: list[str]) -> Tokenizer:
    pre = model.value("tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise model_load_error(model.reference, f"{model.reference}: pre-tokenizer {pre!r} "
                                                f"is not supported", pre_tokenizer=pre)
    split, ignore_merges, _, nfc = _PRE[pre]
    merges = [(m[:cut], m[cut + 1:]) for m in model.value("tokenizer.ggml.merges")
              if (cut := m.find(" ", 1)) > 0]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=merges, ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    elif pre in _DIGITS_NAMES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentencepiece(model: GGUFModel, tokens: list[str], types: list[int]) -> Tokenizer:
    """SentencePiece BPE: llama.cpp merges the adjacent pair whose union scores highest,
    so the merges are every split of every token into two tokens, best union first."""
    gemma = model.architecture.startswith("gemma")
    if gemma:  # Gemma stores its runs of spaces as spaces, not as ▁
        present = set(tokens)
        tokens = [t if t.strip(" ") or "▁" * len(t) in present else "▁" * len(t)
                  for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Gemma's scores do not follow its merge order; its token order does.
    scores = [-float(i) for i in range(len(tokens))] if gemma \
        else model.value("tokenizer.ggml.scores", [0.0] * len(tokens))
    ranked = []
    for token, score, kind in zip(tokens, scores, types, strict=True):
        if kind not in (1, _USER_DEFINED) or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    unknown = model.value("tokenizer.ggml.unknown_token_id", None)
    tokenizer = Tokenizer(models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
        unk_token=tokens[int(unknown)] if unknown is not None else None,
        byte_fallback=True, fuse_unk=True))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    if model.value("tokenizer.ggml.add_space_prefix", not gemma):
        steps.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if len(steps) == 2:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer


def _unique(tokens: list[str]) -> list[str]:
    """The tokens, with an empty or repeated one renamed as llama.cpp names empty ones,
    so that every id keeps a string of its own."""
    seen: set[str] = set()
    out = []
    for index, token in enumerate(tokens):
        if not token or token in seen:
            token = f"[EMPTY_{index}]"
        seen.add(token)
        out.append(token)
    return out


def _ends(model: GGUFModel, tokens: list[str]) -> tuple[str | None, str | None]:
    def token(key: str) -> str | None:
        index = model.value(f"tokenizer.ggml.{key}", None)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) \
            else None
    return token("bos_token_id"), token("eos_token_id")


def _adds(model: GGUFModel) -> tuple[bool, bool]:
    """Whether to add BOS and EOS: the file's flags, else llama.cpp's defaults (BOS for
    SentencePiece and for llama 3's and Tekken's pre-tokenizers)."""
    if model.value("tokenizer.ggml.model") == "llama":
        default_bos = True
    else:
        default_bos = _PRE.get(model.value("tokenizer.ggml.pre", "default"),
                               (None, False, False, False))[2]
    return (bool(model.value("tokenizer.ggml.add_bos_token", default_bos)),
            bool(model.value("tokenizer.ggml.add_eos_token", False)))
