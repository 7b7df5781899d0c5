"""corral on Ray Serve, for real: a local Ray (2 CPUs, no dashboard), two replicas of the
tiny model behind two ingress replicas on 127.0.0.1, driven by the official `openai`
client.

Ray starts once for the module (it takes about half a minute). Expected texts come from
a plain corral serve (the HTTP server over one runtime, same model, same requests),
run before Ray starts, so that the two never share the machine's two cores.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from corral.actors.child_spec import ChildSpec
from corral.config import RuntimeConfig, config_from_mapping
from corral.metrics import Metrics
from corral.runtime import open_runtime
from corral.server.http import HttpServer

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from corral.ray import RayOptions, connect, deploy  # noqa: E402
from corral.ray.deploy import APP_NAME, INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT  # noqa: E402
from corral.ray.routing import affinity_key, preferred_replica  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LOAD = 48  # streams: 42 greedy, and every 8th (from the 7th) seeded
CONCURRENCY = 8
MAX_TOKENS = 96
LONG = 16  # greedy streams a scale-down or a killed ingress cuts under
LONG_TOKENS = 512
LONG_BASE = 1000  # their conversations: _chat(LONG_BASE + i)


def _config() -> RuntimeConfig:
    return config_from_mapping({
        "stream_registry": {"max_active_streams": 8, "max_queued": 16},
        "server": {"drain_timeout_ms": 2000},
        # One engine failure fails the model for a minute: a replica health can fail.
        "restarts": {"max_restarts": 0},
        # The ingresses share one retry budget: sized so that the requests two stopped
        # replicas strand in a redeploy (up to 24 each) may all go elsewhere.
        "calls": {"circuit_breaker": {"recovery_timeout_ms": 60000},
                  "retry": {"budget": {"max_retry_tokens": 100.0}}}})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _chat(i: int) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Request {i}: tell me about fox number {i}."}]


def _sampling(i: int) -> dict[str, Any]:
    """Load request i's sampling: greedy, or seeded for every 8th (both deterministic,
    so both resume on another replica)."""
    return {"temperature": 1.0, "seed": i} if _seeded(i) else {"temperature": 0.0}


def _seeded(i: int) -> bool:
    return i % 8 == 6


def _stream_text(client: openai.OpenAI, messages: list[ChatCompletionMessageParam],
                 on_chunk: Callable[[str], None] = lambda _: None, i: int = 0) -> str:
    parts = []
    with client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                        max_tokens=MAX_TOKENS, **_sampling(i)) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                on_chunk(chunk.choices[0].delta.content)
    return "".join(parts)


def _long_text(client: openai.OpenAI, i: int) -> str:
    with client.chat.completions.create(
            model="tiny", messages=_chat(LONG_BASE + i), stream=True, max_tokens=LONG_TOKENS,
            temperature=0.0) as stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream
                       if chunk.choices)


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120.0)


@dataclass
class Reference:
    """What a plain corral serve answers, fault-free."""

    completion: str
    chat: str
    streams: list[str]
    long: list[str]


def _reference(model_path: str) -> Reference:
    """Run a plain corral serve (one runtime, its HTTP server) and ask it everything."""

    async def main() -> Reference:
        async with open_runtime(_config(), models={"tiny": model_path}) as rt:
            port = _free_port()
            metrics = Metrics(rt)
            await rt.start_transport(ChildSpec(
                name="http", factory=lambda: HttpServer(rt, "127.0.0.1", port, metrics)))

            def ask() -> Reference:
                with _client(f"http://127.0.0.1:{port}/v1") as client:
                    completion = client.completions.create(
                        model="tiny", prompt="The quick brown fox", max_tokens=24,
                        temperature=0.0)
                    chat = client.chat.completions.create(
                        model="tiny", messages=_chat(-1), max_tokens=24, temperature=0.0)
                    streams = [_stream_text(client, _chat(i), i=i) for i in range(LOAD)]
                    with ThreadPoolExecutor(LONG) as pool:
                        long = list(pool.map(lambda i: _long_text(client, i), range(LONG)))
                return Reference(completion.choices[0].text,
                                 chat.choices[0].message.content or "", streams, long)

            reference = await trio.to_thread.run_sync(ask)
            metrics.close()
            return reference

    return trio.run(main)


@dataclass
class Cluster:
    base_url: str
    reference: Reference
    started_s: float
    redeploy: Callable[[RayOptions], None]
    """`deploy` again with other options, as `corral serve --ray` deploys."""


ORIGINAL = RayOptions(replicas=2, health_check_period_s=1.0)


@pytest.fixture(scope="module")
def cluster(model_path: str) -> Iterator[Cluster]:
    reference = _reference(model_path)
    started = time.monotonic()
    connect("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()

    def redeploy(options: RayOptions) -> None:
        deploy(_config(), {"tiny": model_path}, "127.0.0.1", port, options)

    try:
        redeploy(ORIGINAL)
        yield Cluster(f"http://127.0.0.1:{port}/v1", reference, time.monotonic() - started,
                      redeploy)
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica_actors(deployment: str = REPLICA_DEPLOYMENT) -> dict[str, str]:
    """Replica id → actor name, for the live replicas of a corral deployment."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    return {actor["name"][len(prefix):]: actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)}


def _running_replicas(deployment: str = REPLICA_DEPLOYMENT) -> int:
    app = serve.status().applications[APP_NAME]
    states = app.deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_greedy_answers_equal_corral_serve(cluster: Cluster) -> None:
    with _client(cluster.base_url) as client:
        completion = client.completions.with_raw_response.create(
            model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0.0)
        chat = client.chat.completions.create(
            model="tiny", messages=_chat(-1), max_tokens=24, temperature=0.0)
        streamed = _stream_text(client, _chat(0))
        models = client.models.list()
    assert completion.headers["x-corral-replica"] in _replica_actors()
    assert completion.headers["x-request-id"]
    assert completion.parse().choices[0].text == cluster.reference.completion
    assert chat.choices[0].message.content == cluster.reference.chat
    assert streamed == cluster.reference.streams[0]
    assert [m.id for m in models.data] == ["tiny"]


def test_errors_are_corral_serves(cluster: Cluster) -> None:
    """Bad input is the replica's typed 400 and unknown model its 404, through the
    ingress, and the next request is served."""
    with _client(cluster.base_url) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="tiny", messages=_chat(1),
                                           max_tokens=8, temperature=9.0)
        assert bad.value.body["code"] == "InvalidParams"  # type: ignore[index]
        assert bad.value.body["param"] == "temperature"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope", messages=_chat(1), max_tokens=8)
        assert missing.value.body["code"] == "ModelNotLoaded"  # type: ignore[index]
        chat = client.chat.completions.create(
            model="tiny", messages=_chat(-1), max_tokens=24, temperature=0.0)
    assert chat.choices[0].message.content == cluster.reference.chat


def test_health_and_metrics_through_the_ingress_cover_every_replica(cluster: Cluster) -> None:
    """GET /health through the ingress has every replica's verdict; GET /metrics has
    every replica's samples, labelled by replica, so it counts the requests of both."""
    ids = list(_replica_actors())
    assert len(ids) == 2
    root = cluster.base_url.removesuffix("/v1")
    with _client(cluster.base_url) as client:
        for replica in ids:  # a request for each replica, by its conversations' hash
            i = next(i for i in range(300, 400)
                     if preferred_replica(_key(_chat(i)) or "", ids) == replica)
            served = client.chat.completions.with_raw_response.create(
                model="tiny", messages=_chat(i), max_tokens=4, temperature=0.0)
            assert served.headers["x-corral-replica"] == replica
    health = httpx.get(f"{root}/health", timeout=60.0)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert set(health.json()["replicas"]) == set(ids)
    assert all(h["status"] == "ok" for h in health.json()["replicas"].values())
    metrics = httpx.get(f"{root}/metrics", timeout=60.0).text
    served = {sample.labels["replica"]: sample.value
              for family in text_string_to_metric_families(metrics)
              for sample in family.samples if sample.name == "corral_requests_total"
              and sample.labels["outcome"] == "success"}
    assert set(served) == set(ids) and all(count >= 1 for count in served.values()), served
    assert metrics.count("# TYPE corral_requests_total counter") == 1


def _key(messages: list[ChatCompletionMessageParam]) -> str | None:
    return affinity_key("/v1/chat/completions",
                        json.dumps({"model": "tiny", "messages": messages}).encode())


def test_turns_of_one_conversation_land_on_one_replica(cluster: Cluster) -> None:
    """Both turns of a conversation go to the replica its opening hashes to, and the
    second finds the first's prefix there; conversations for each replica are tried."""
    ids = list(_replica_actors())
    chosen = {replica: [i for i in range(100, 200)
                        if preferred_replica(_key(_chat(i)) or "", ids) == replica][:3]
              for replica in ids}
    with _client(cluster.base_url) as client:
        for replica, conversations in chosen.items():
            assert conversations
            for i in conversations:
                first = client.chat.completions.with_raw_response.create(
                    model="tiny", messages=_chat(i), max_tokens=8, temperature=0.0)
                answer = first.parse().choices[0].message.content or ""
                turns: list[ChatCompletionMessageParam] = [
                    *_chat(i), {"role": "assistant", "content": answer},
                    {"role": "user", "content": "And then?"}]
                assert _key(turns) == _key(_chat(i))
                second = client.chat.completions.with_raw_response.create(
                    model="tiny", max_tokens=8, temperature=0.0, messages=turns)
                assert first.headers["x-corral-replica"] == replica
                assert second.headers["x-corral-replica"] == replica
                # The second turn starts from the first turn's prefix on that replica.
                usage = second.parse().usage
                assert usage is not None and usage.prompt_tokens_details is not None
                assert (usage.prompt_tokens_details.cached_tokens or 0) > 0


@dataclass
class _Progress:
    """What the load's worker threads report: each request's replica and chunks."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    replica: dict[int, str] = field(default_factory=dict)
    ingress: dict[int, str] = field(default_factory=dict)
    chunks: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


def test_killed_replica_loses_no_stream(cluster: Cluster) -> None:
    """ray.kill of one replica, while a seeded stream on it is mid-way, under 48 streams
    (42 greedy, 6 seeded) at concurrency 8: every stream completes with its fault-free
    text (retried before its first token, resumed on the other replica after it), none
    hangs, and Serve brings the replica back."""
    before = _replica_actors()
    assert len(before) == 2
    progress = _Progress()

    def one(i: int) -> str:
        with _client(cluster.base_url) as client:
            raw = client.chat.completions.with_streaming_response.create(
                model="tiny", messages=_chat(i), stream=True, max_tokens=MAX_TOKENS,
                **_sampling(i))
            with raw as response:
                with progress.lock:
                    progress.replica[i] = response.headers["x-corral-replica"]
                parts = []
                for chunk in response.parse():
                    if chunk.choices and chunk.choices[0].delta.content:
                        parts.append(chunk.choices[0].delta.content)
                        with progress.lock:
                            progress.chunks[i] = progress.chunks.get(i, 0) + 1
        with progress.lock:
            progress.done.add(i)
        return "".join(parts)

    victim: dict[str, Any] = {}

    def kill_mid_stream() -> None:
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            with progress.lock:
                midway = [i for i, n in progress.chunks.items()
                          if n >= 6 and i not in progress.done and i in progress.replica]
                seeded = [i for i in midway if _seeded(i)]
                if seeded:
                    victim["replica"] = progress.replica[seeded[0]]
                    victim["midway"] = {i for i in midway
                                        if progress.replica[i] == victim["replica"]}
                    break
            time.sleep(0.002)
        else:
            return
        ray.kill(ray.get_actor(before[victim["replica"]], namespace="serve"),
                 no_restart=True)

    killer = threading.Thread(target=kill_mid_stream)
    killer.start()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one, i) for i in range(LOAD)]
        texts = [future.result(timeout=300) for future in futures]  # none hangs
    killer.join()
    assert victim, "no stream was mid-way to kill its replica under"
    assert any(_seeded(i) for i in victim["midway"])  # cut mid-way, a seeded one too...
    assert texts == cluster.reference.streams  # ... and every text as without the kill
    _wait_replicas(2, gone=victim["replica"])
    with _client(cluster.base_url) as client:
        assert _stream_text(client, _chat(0)) == cluster.reference.streams[0]


def _wait_replicas(count: int, gone: str | None = None, timeout: float = 120.0,
                   deployment: str = REPLICA_DEPLOYMENT) -> None:
    """Wait until Serve runs exactly `count` replicas of `deployment`, `gone` not among
    them, and no other is alive (one that stops is alive until it has shut down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = _replica_actors(deployment)
        if len(alive) == count and gone not in alive and _running_replicas(deployment) == count:
            return
        time.sleep(0.25)
    raise AssertionError(f"Serve did not come to {count} {deployment} replicas without "
                         f"{gone} in {timeout} s: {_replica_actors(deployment)}, "
                         f"{_running_replicas(deployment)} running")


def test_failed_model_fails_its_replica_and_serve_replaces_it(cluster: Cluster) -> None:
    """A model failed for good is corral's health saying no: Serve's health check asks
    it, and replaces the replica. Meanwhile requests are served by the other one."""
    _wait_routing_to_every_replica(cluster)
    replicas = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP_NAME)
    victim = replicas.inject_fault.remote("tiny", "raise").result(timeout_s=30)
    ids = list(_replica_actors())
    assert victim in ids
    # A conversation the router sends to the victim, which makes its engine step.
    i = next(i for i in range(200, 400) if preferred_replica(_key(_chat(i)) or "", ids)
             == victim)
    with _client(cluster.base_url) as client:
        try:
            client.chat.completions.create(model="tiny", messages=_chat(i), max_tokens=8,
                                           temperature=0.0)
        except openai.APIStatusError as exc:  # the failing step's own request
            assert exc.status_code in (500, 503)
            assert exc.body["retryable"] is True  # type: ignore[index]
        # The next request is served (by the other replica while the victim's model is
        # failed: its 503 is asked of the other one).
        served = client.chat.completions.with_raw_response.create(
            model="tiny", messages=_chat(-1), max_tokens=24, temperature=0.0)
    assert served.parse().choices[0].message.content == cluster.reference.chat
    _wait_replicas(2, gone=victim)


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


@dataclass
class _Ended:
    """How one stream ended: its text, and the error event that ended it, if any."""

    text: str
    error: dict[str, Any] | None = None


def _long_stream(cluster: Cluster, progress: _Progress, i: int) -> _Ended:
    """Long greedy stream i, noting its replica, its ingress and its chunks."""
    parts: list[str] = []
    with _client(cluster.base_url) as client:
        raw = client.chat.completions.with_streaming_response.create(
            model="tiny", messages=_chat(LONG_BASE + i), stream=True,
            max_tokens=LONG_TOKENS, temperature=0.0)
        with raw as response:
            with progress.lock:
                progress.replica[i] = response.headers["x-corral-replica"]
                progress.ingress[i] = response.headers["x-corral-ingress"]
            try:
                for chunk in response.parse():
                    if chunk.choices and chunk.choices[0].delta.content:
                        parts.append(chunk.choices[0].delta.content)
                        with progress.lock:
                            progress.chunks[i] = progress.chunks.get(i, 0) + 1
            except openai.APIError as exc:  # an error event: the stream's last
                assert isinstance(exc.body, dict), exc
                return _Ended("".join(parts), exc.body)
            finally:
                with progress.lock:
                    progress.done.add(i)
    return _Ended("".join(parts))


def _wait_routing_to_every_replica(cluster: Cluster) -> None:
    """Wait until both ingresses know every running replica: a conversation goes to
    the replica its opening hashes to (a replica that Serve just started is routed to
    once each ingress's handle has heard of it)."""
    ids = list(_replica_actors())

    def routed() -> bool:
        with _client(cluster.base_url) as client:
            for replica in ids:
                for i in [i for i in range(400, 500)
                          if preferred_replica(_key(_chat(i)) or "", ids) == replica][:4]:
                    served = client.chat.completions.with_raw_response.create(
                        model="tiny", messages=_chat(i), max_tokens=1, temperature=0.0)
                    if served.headers["x-corral-replica"] != replica:
                        return False
        return True

    _wait_until(routed, 60.0, f"both ingresses routing to every replica of {ids}")


def _midway(progress: _Progress, by: dict[int, str]) -> dict[str, list[int]]:
    """The streams running with 4 chunks or more, grouped by `by` (their replica or
    their ingress). A replica runs 8 streams at once, so of 16 some may still wait."""
    groups: dict[str, list[int]] = {}
    with progress.lock:
        for i, chunks in progress.chunks.items():
            if chunks >= 4 and i not in progress.done:
                groups.setdefault(by[i], []).append(i)
    return groups


def _check_ended(cluster: Cluster, ended: list[_Ended]) -> None:
    """Each stream ended with its fault-free text, or with corral's typed, retryable
    error event after a correct start."""
    for i, end in enumerate(ended):
        if end.error is None:
            assert end.text == cluster.reference.long[i], i
        else:  # ended early, as corral ends a stream it cannot finish
            assert end.error["retryable"] is True, end.error
            assert end.error["code"] in ("ServerError", "TransportError"), end.error
            assert cluster.reference.long[i].startswith(end.text), i


def _next_request_is_served(cluster: Cluster) -> None:
    with _client(cluster.base_url) as client:
        chat = client.chat.completions.create(
            model="tiny", messages=_chat(-1), max_tokens=24, temperature=0.0)
    assert chat.choices[0].message.content == cluster.reference.chat


def test_scale_down_loses_no_stream(cluster: Cluster) -> None:
    """`deploy` again with 1 replica instead of 2, under 16 long greedy streams spread
    over both replicas and both ingresses. `serve.run` gives each deployment a new
    version, so Serve stops the old replicas and ingresses gracefully and starts new
    ones: it waits for a replica's streams up to `graceful_shutdown_timeout_s`, then
    `__del__` drains its runtime; a replica whose streams outlast that is killed, and the
    ingress resumes them on the replica left; an ingress whose streams outlast its own
    timeout is killed, and the proxy's guard continues them through a new ingress. Every
    stream ends with its fault-free text or with corral's typed, retryable error event,
    none hangs, and the next request is served. The two replicas are restored."""
    _wait_routing_to_every_replica(cluster)
    progress = _Progress()
    try:
        with ThreadPoolExecutor(LONG) as pool:
            futures = [pool.submit(_long_stream, cluster, progress, i) for i in range(LONG)]
            _wait_until(lambda: len(_midway(progress, progress.replica)) == 2, 120.0,
                        "streams mid-way on both replicas")
            cut = set(_midway(progress, progress.replica))
            cluster.redeploy(RayOptions(replicas=1, health_check_period_s=1.0))
            ended = [future.result(timeout=300) for future in futures]  # none hangs
        assert len(cut) == 2, "both replicas were stopped with streams on them"
        _check_ended(cluster, ended)
        _wait_replicas(1)
        _next_request_is_served(cluster)
    finally:
        cluster.redeploy(ORIGINAL)
        _wait_replicas(2)


def test_killed_ingress_loses_no_stream(cluster: Cluster) -> None:
    """ray.kill of the ingress replica that relays the most streams mid-way, under 16
    long greedy streams over both ingresses: Serve's proxy loses the call, and its guard
    continues each of those streams through the other ingress (the tokens the client
    has as `generated=`). Every stream ends with its fault-free text or with a typed,
    retryable error event after a correct start (here: at least one on the killed
    ingress completes), none hangs, the next request is served, and Serve brings the
    ingress back."""
    assert len(_replica_actors(INGRESS_DEPLOYMENT)) == 2
    _wait_routing_to_every_replica(cluster)
    progress = _Progress()
    with ThreadPoolExecutor(LONG) as pool:
        futures = [pool.submit(_long_stream, cluster, progress, i) for i in range(LONG)]
        _wait_until(lambda: len(_midway(progress, progress.ingress)) == 2, 120.0,
                    "streams mid-way through both ingresses")
        midway = _midway(progress, progress.ingress)
        victim = max(midway, key=lambda ingress: len(midway[ingress]))
        ray.kill(ray.get_actor(_replica_actors(INGRESS_DEPLOYMENT)[victim],
                               namespace="serve"), no_restart=True)
        ended = [future.result(timeout=300) for future in futures]  # none hangs
    cut = midway[victim]
    _check_ended(cluster, ended)
    assert any(ended[i].error is None for i in cut), "a stream continued elsewhere"
    _next_request_is_served(cluster)
    _wait_replicas(2, gone=victim, deployment=INGRESS_DEPLOYMENT)


# Serve 2.60 pushes a handle's load every `metrics_interval_s` (10 s by default); the
# field is deprecated for environment variables that it does not read yet.
@pytest.mark.filterwarnings("ignore:The `metrics_interval_s`:DeprecationWarning")
def test_autoscaling_follows_running_and_waiting_streams(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """`RayOptions(autoscale=(1, 2))`: Serve targets `max_active_streams` ongoing
    requests per replica, which for corral are its running plus waiting streams. Twice
    that many requests at once, without pause, bring a second replica, which then takes
    its share; when they end, Serve goes back
    to one. Serve's delays and metric periods (30 s up, 600 s down, a 30 s window, a
    push every 10 s by default) are shortened here; the rest of the autoscaling config
    is corral's. The two replicas are restored."""
    built: dict[str, Any] = {}
    deployment = serve.deployment

    def quick(*args: Any, **kwargs: Any) -> Any:
        if "autoscaling_config" in kwargs:
            built.update(kwargs["autoscaling_config"])
            kwargs["autoscaling_config"] = {
                **kwargs["autoscaling_config"], "upscale_delay_s": 0.0,
                "downscale_delay_s": 1.0, "look_back_period_s": 2.0,
                "metrics_interval_s": 0.5}
        return deployment(*args, **kwargs)

    streams = 2 * _config().stream_registry.max_active_streams
    stop = threading.Event()
    served: list[str] = []

    def load(i: int) -> None:
        with _client(cluster.base_url) as client:
            while not stop.is_set():
                raw = client.chat.completions.with_raw_response.create(
                    model="tiny", messages=_chat(2000 + i), max_tokens=64, temperature=0.0)
                served.append(raw.headers["x-corral-replica"])

    try:
        with monkeypatch.context() as patch:
            patch.setattr(serve, "deployment", quick)
            cluster.redeploy(RayOptions(autoscale=(1, 2), health_check_period_s=1.0))
        assert built == {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                         "target_ongoing_requests": streams // 2}
        _wait_replicas(1)
        with ThreadPoolExecutor(streams) as pool:
            futures = [pool.submit(load, i) for i in range(streams)]
            try:
                _wait_replicas(2, timeout=60.0)
                # Both serve: the new replica takes its share of the streams.
                served.clear()
                _wait_until(lambda: len(set(served)) == 2, 30.0, "both replicas serving")
            finally:
                stop.set()
            for future in futures:
                future.result(timeout=60)
        _wait_replicas(1, timeout=60.0)
        with _client(cluster.base_url) as client:
            chat = client.chat.completions.create(
                model="tiny", messages=_chat(-1), max_tokens=24, temperature=0.0)
        assert chat.choices[0].message.content == cluster.reference.chat
    finally:
        stop.set()
        cluster.redeploy(ORIGINAL)
        _wait_replicas(2)
