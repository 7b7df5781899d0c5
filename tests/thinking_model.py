"""A copy of the tiny model that thinks: its tokenizer gains `<think>` and `</think>`
as added tokens (so mlx_lm's tokenizer reports `has_thinking`), and its weights make
greedy decoding write them where it would write two chosen tokens.

Each marker's embedding is the chosen token's, and its output row is that token's with
a little more of the bias channel (`corral.tiny`'s channel 0, positive in every hidden
state), so its logit is always just above the chosen token's: wherever greedy decoding
would pick the chosen token it picks the marker, and the context it leaves is the same.
Test-only: `corral.tiny` stays the one model the product makes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer

THINK_START = "<think>"
THINK_END = "</think>"


def make_thinking_model(tiny: str | Path, target: Path, *, start_like: int,
                        end_like: int) -> Path:
    """Copy the model at `tiny` to `target`, with think markers that greedy decoding
    writes in place of the tokens `start_like` and `end_like`."""
    shutil.copytree(tiny, target)
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(THINK_START, special=False, normalized=False),
                          AddedToken(THINK_END, special=False, normalized=False)])
    tokenizer.save(str(target / "tokenizer.json"))
    config = json.loads((target / "config.json").read_text())
    vocab = config["vocab_size"]
    assert tokenizer.token_to_id(THINK_START) == vocab
    weights = mx.load(str(target / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = weights[name][mx.array([start_like, end_like])]
        if name == "lm_head.weight":
            rows[:, 0] += 0.5
        weights[name] = mx.concatenate([weights[name], rows])
    mx.save_safetensors(str(target / "model.safetensors"), weights,
                        metadata={"format": "mlx"})
    config["vocab_size"] = vocab + 2
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
