"""Prefix-affine routing and `corral serve --ray`'s options, without starting Ray: the
affinity key, rendezvous hashing, and a bad option refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("ray")

from corral.ray.deploy import parse_autoscale
from corral.ray.routing import PROMPT_PREFIX_CHARS, affinity_key, preferred_replica

CHAT = "/v1/chat/completions"


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", **fields}).encode()


def test_every_turn_of_a_conversation_has_its_first_turns_key() -> None:
    opening = [{"role": "system", "content": "Be terse."},
               {"role": "user", "content": "Hello"}]
    first = affinity_key(CHAT, _body(messages=opening))
    later = affinity_key(CHAT, _body(messages=[
        *opening, {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "More"}]))
    other = affinity_key(CHAT, _body(messages=[opening[0],
                                               {"role": "user", "content": "Bye"}]))
    assert first is not None and first == later
    assert other != first
    assert affinity_key(CHAT, json.dumps({"model": "other", "messages": opening}).encode()) \
        != first


def test_a_continued_prompt_keeps_its_key() -> None:
    prompt = "x" * PROMPT_PREFIX_CHARS
    assert affinity_key("/v1/completions", _body(prompt=prompt)) == affinity_key(
        "/v1/completions", _body(prompt=prompt + " and then some more"))
    assert affinity_key("/v1/completions", _body(prompt="a")) != affinity_key(
        "/v1/completions", _body(prompt="b"))


@pytest.mark.parametrize(("path", "body"), [
    (CHAT, b"not json"), (CHAT, b"[1, 2]"), (CHAT, _body(messages="hi")),
    (CHAT, _body(messages=[])), ("/v1/completions", _body(prompt="")),
    ("/v1/models", _body())])
def test_no_key_for_what_has_no_prompt(path: str, body: bytes) -> None:
    assert affinity_key(path, body) is None


def test_rendezvous_hashing_spreads_keys_and_moves_only_a_lost_replicas() -> None:
    replicas = ["a1", "b2", "c3"]
    keys = [str(i) for i in range(300)]
    placed = {key: preferred_replica(key, replicas) for key in keys}
    counts = {r: list(placed.values()).count(r) for r in replicas}
    assert all(count > 50 for count in counts.values()), counts
    survivors = ["a1", "c3"]
    for key, replica in placed.items():
        moved = preferred_replica(key, survivors)
        assert moved == replica or replica == "b2"


def test_autoscale_option() -> None:
    assert parse_autoscale("1:4") == (1, 4)
    assert parse_autoscale("0:1") == (0, 1)
    for bad in ("4:1", "0:0", "2", "a:b", "-1:2"):
        with pytest.raises(ValueError, match="--autoscale"):
            parse_autoscale(bad)


def test_serve_ray_refuses_a_bad_option_before_starting() -> None:
    done = subprocess.run([sys.executable, "-m", "corral.cli", "serve", "--ray",
                           "--autoscale", "3:1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "--autoscale: expected MIN:MAX" in done.stderr
