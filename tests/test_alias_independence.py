"""Issue 21, item 1: an alias names a subtree of actors, so it is checked against one
character set at every entry (config, `Runtime.load_model`, the admin API, JSON-RPC's
params), and one model's unload never touches another model's actors. A request never
waits on a restarting model past its own deadline, and /health is not ok while a model
restarts past its limit.

Before the fix, loading the tiny model as ``tiny/model`` and unloading it left ``tiny``
restarting for good: its requests hung and /health said ok.
"""

from __future__ import annotations

import pytest
import trio

from corral.actors.child_spec import ChildSpec
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.config import ConfigError, config_from_mapping
from corral.protocol.codec import convert_params
from corral.protocol.errors import Code, CorralError
from corral.protocol.jsonrpc import LoadModelParams, UnloadModelParams
from corral.runtime import open_runtime
from corral.runtime.health import ModelDescription, assess
from corral.runtime.models import check_alias
from test_http import serve_http

pytestmark = pytest.mark.slow

KEY = "s3cret-admin-key-0123"
BAD = ["tiny/model", "../tiny", "", " tiny", "tiny model", "-tiny", "a" * 129, "tiny\n"]
GOOD = ["tiny", "SmolLM2-135M-Instruct.Q4_1", "ollama:qwen3:0.6b", "a" * 128, "M_1"]


@pytest.mark.parametrize("alias", BAD)
def test_a_bad_alias_is_invalid_params_at_every_entry(alias: str) -> None:
    with pytest.raises(CorralError) as checked:
        check_alias(alias)
    assert checked.value.code is Code.INVALID_PARAMS
    assert checked.value.details == {"field": "alias"}
    for params, type_ in (({"path": "p", "alias": alias}, LoadModelParams),
                          ({"alias": alias}, UnloadModelParams)):
        with pytest.raises(CorralError) as decoded:
            convert_params(params, type_)
        assert decoded.value.code is Code.INVALID_PARAMS
        assert decoded.value.details == {"field": "alias"}
    with pytest.raises(ConfigError, match=r"generation\.models\[0\]\.alias"):
        config_from_mapping({"generation": {"models": [{"alias": alias, "path": "p"}]}})


@pytest.mark.parametrize("alias", GOOD)
def test_gguf_and_ollama_style_aliases_stay_valid(alias: str) -> None:
    assert check_alias(alias) == alias
    assert convert_params({"path": "p", "alias": alias}, LoadModelParams).alias == alias


async def test_a_supervisor_child_name_never_holds_a_slash() -> None:
    sup = Supervisor([])
    with pytest.raises(CorralError) as refused:
        await sup.start_child(ChildSpec(name="a/b", factory=lambda: Supervisor([])))
    assert refused.value.code is Code.INVALID_PARAMS


async def test_alias_with_slash_is_refused_and_the_other_model_keeps_serving(
        model_path: str) -> None:
    config = config_from_mapping({"server": {"admin_api_key": KEY}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        served = await serve_http(rt)
        headers = {"authorization": f"Bearer {KEY}"}
        refused = await served.post("/v1/models/load", headers=headers,
                                    json={"path": model_path, "alias": "tiny/model"})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("InvalidParams", "alias")
        with pytest.raises(CorralError) as embedded:
            await rt.load_model(model_path, alias="tiny/model")
        assert embedded.value.code is Code.INVALID_PARAMS
        unloaded = await served.post("/v1/models/unload", headers=headers,
                                     json={"alias": "tiny/model"})
        assert unloaded.status_code == 400, unloaded.text
        assert [(m.alias, m.state) for m in rt.list_models()] == [("tiny", "ready")]
        with trio.fail_after(60):
            chat = await served.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        assert rt.health().ok
        served.metrics.close()


async def test_a_request_never_waits_on_a_restarting_model_past_its_deadline(
        model_path: str) -> None:
    # The model actor's restart waits a minute: a request with a 300 ms deadline gets
    # its Timeout at the deadline, not when the model comes back.
    config = config_from_mapping({"restarts": {"delay_base_ms": 60000,
                                               "delay_max_ms": 60000}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        subtree = rt.domain("generation").child("model:tiny")
        assert isinstance(subtree, Supervisor)
        subtree.kill_child("model")
        with trio.fail_after(30), pytest.raises(CorralError) as waited:
            await rt.complete("tiny", prompt="Hi", max_tokens=2, timeout_ms=300)
        assert waited.value.code is Code.TIMEOUT
        assert [m.state for m in rt.list_models()] == ["restarting"]


def test_health_is_not_ok_while_a_model_restarts_past_its_limit() -> None:
    def model(restarting_s: float | None) -> ModelDescription:
        return ModelDescription(alias="tiny", path="p", state="restarting", fallbacks=[],
                                info=None, restarts=1, breaker="closed",
                                restarting_s=restarting_s)

    def reasons(restarting_s: float) -> list[str]:
        return assess(ActorSystem(), [model(restarting_s)], draining=False, progress={},
                      active_streams=0, restart_limit_s=90.0).reasons

    assert not any("tiny" in r for r in reasons(10.0))
    assert any("model tiny has been restarting for 91.0s" in r for r in reasons(91.0))
