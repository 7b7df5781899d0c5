"""Reasoning: the text a thinking model writes between its think markers, read apart
from its answer as the stream arrives.

A model whose tokenizer has think markers (mlx_lm's `has_thinking`: `<think>` and
`</think>` for Qwen 3 and DeepSeek R1) writes its reasoning between them; a chat
reply gives that text as `reasoning_content` (vLLM's name; mlx_lm.server's
`reasoning`) and the rest as `content`. A prompt that ends inside a think block (the
chat template opened it, as Qwen 3's does with `enable_thinking`) starts in the
reasoning state, as in mlx_lm.server. Markers are matched on the text with mlx_lm's
`TextStateMachine`, the one `ToolCallReader` uses; the reasoning is read first and the
tool calls from the content, as vLLM's reasoning and tool parsers run.

No MLX of its own: mlx_lm (and so MLX) is imported only for a chat with a model that
thinks.
"""

from __future__ import annotations

from typing import final

from corral.engine.mlx_import import import_mlx_lm
from corral.protocol.messages import Thinking

__all__ = ["ReasoningReader", "starts_inside"]


def _rfind(ids: list[int], marker: list[int]) -> int:
    """Where `marker` last starts in `ids`, or -1."""
    width = len(marker)
    for at in range(len(ids) - width, -1, -1):
        if ids[at:at + width] == marker:
            return at
    return -1


def starts_inside(thinking: Thinking, prompt: list[int]) -> bool:
    """Whether `prompt` ends inside a think block: its last start marker comes after
    its last end marker (mlx_lm.server's test)."""
    return _rfind(prompt, thinking.start_ids) > _rfind(prompt, thinking.end_ids)


@final
class ReasoningReader:
    """Splits one stream's text into content and reasoning, as it arrives.

    The markers themselves are dropped. Text that might begin a marker is held back
    until it is known not to; what is held when the stream ends goes where the stream
    was (`finish`), so no text is lost. A stream that ends inside its reasoning gives
    all it wrote as reasoning.

    Args:
        thinking: the model's markers.
        inside: the prompt ended inside a think block (`starts_inside`).
    """

    def __init__(self, thinking: Thinking, *, inside: bool) -> None:
        import_mlx_lm()
        from mlx_lm.generate import TextStateMachine

        self._machine = TextStateMachine({"normal": [(thinking.start, "reasoning")],
                                          "reasoning": [(thinking.end, "normal")]})
        self._state = self._machine.make_state("reasoning" if inside else "normal")

    def feed(self, text: str) -> tuple[str, str]:
        """The content and the reasoning that `text` completes."""
        self._state, segments = self._machine.split(self._state, text)
        content = "".join(piece for state, piece in segments if state == "normal")
        reasoning = "".join(piece for state, piece in segments if state == "reasoning")
        return content, reasoning

    def finish(self) -> tuple[str, str]:
        """What was held back when the stream ends, as (content, reasoning)."""
        state, _, _, pending = self._state
        return ("", str(pending)) if state == "reasoning" else (str(pending), "")
