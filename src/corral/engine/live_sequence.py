"""One sequence in an engine's batch: what its prefill has left, its text so far, and
how each token it samples becomes a `TokenOut`.

Engine thread only (`corral.engine.core` owns these). It must never touch the batch
itself: ending a sequence in the `BatchGenerator` is the core's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.engine.logprobs import token_logprobs
from corral.engine.text import StopText
from corral.protocol.messages import FinishReason, TokenOut

__all__ = ["LiveSequence"]


@dataclass(eq=False)
class LiveSequence:
    """A sequence the engine runs, under its `BatchGenerator` uid."""

    seq_id: int
    uid: int
    text: StopText
    logprobs: int | None  # alternatives to report with each token; None: no logprobs
    tokens: list[int]  # prompt + generated as submitted: what its prefill computes
    cached_tokens: int  # leading tokens taken from the prefix cache, not prefilled
    to_prefill: int  # tokens its prefill has still to compute
    prefilled: bool = False
    reported: bool = False  # cached_tokens went out with the first TokenOut

    def token_out(self, response: Any, tokenizer: Any) -> TokenOut:
        """The `TokenOut` of one generation response of this sequence.

        Its finish reason is the generator's, or "stop" when the text reached a stop
        string: if the generator did not end the sequence itself then, the caller must
        remove it from the batch.
        """
        token = int(response.token)
        finish: FinishReason | None = response.finish_reason
        if finish == "stop":
            # A stop token (EOS or stop_token_ids) ends the text without being in it.
            text, _ = self.text.finish()
        else:
            text, hit = self.text.push(token)
            if hit:
                finish = "stop"
            elif finish == "length":
                rest, hit = self.text.finish()
                text += rest
                if hit:
                    finish = "stop"
        logprob = piece = top = None
        if self.logprobs is not None:
            logprob, piece, top = token_logprobs(tokenizer, token, response.logprobs,
                                                 self.logprobs)
        cached = 0 if self.reported else self.cached_tokens
        self.reported = True
        return TokenOut(self.seq_id, token, text, logprob, finish, cached, piece, top)
