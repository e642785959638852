"""The teacher Serve deployment: wire format, options, OpenAI routes and batching (autoscaling and
health checks under a real engine: ``test_teacher_replicas.py``)."""

import functools
import json
import urllib.error
import urllib.request

import pytest

from actors.teacher import (
    DEPLOYMENT_NAME,
    ReplicaThreads,
    build_teacher_app,
    deployment_options,
    params_from_dict,
    prompt_from_dict,
    prompt_to_dict,
    start_teacher,
)
from gold_ray.allocator import KEEP_FREED_MEMORY_ENV
from gold_ray.devices import shared_threads
from gold_ray.testing import FakeTeacherEngine, ProcessFactsEngine
from gold_ray.types import Prompt, SamplingParams
from tests.raykit import chat_prompts, make_cfg

# --- no cluster needed ----------------------------------------------------------------------------


def test_prompt_round_trips_through_json():
    chat = Prompt(
        kind="probe",
        label="negative",
        messages=({"role": "user", "content": "hi"},),
        prefill="Review:",
        stop=("\n",),
        meta={"style": "terse", "demo_ids": (1, 2), "obj": object()},
    )
    text = Prompt(kind="train", label=None, text="Once upon a time", stop=())
    for prompt in (chat, text):
        back = prompt_from_dict(json.dumps(prompt_to_dict(prompt)))
        assert back == prompt  # meta is not compared by Prompt equality
    back = prompt_from_dict(prompt_to_dict(chat))
    assert back.meta["style"] == "terse" and back.meta["demo_ids"] == [1, 2]


def test_params_fill_only_the_given_keys():
    default = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=32)
    got = params_from_dict({"temperature": 0.0, "top_p": None, "unknown": 3}, default)
    assert got == SamplingParams(temperature=0.0, top_p=0.9, max_new_tokens=32)
    assert params_from_dict(None, default) == default


def test_deployment_options_come_from_the_serve_section():
    cfg = make_cfg(
        teacher={
            "serve": {
                "min_replicas": 0,
                "max_replicas": 3,
                "target_ongoing_requests": 8,
                "max_ongoing_requests": 16,
                "num_cpus": 0.5,
                "num_gpus": 1,
            }
        }
    )
    opts = deployment_options(cfg, {"upscale_delay_s": 1.0})
    assert opts["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 1.0,
    }
    assert opts["max_ongoing_requests"] == 16
    # Serve's own health check runs TeacherDeployment.check_health on the configured clock.
    assert (opts["health_check_period_s"], opts["health_check_timeout_s"]) == (10.0, 30.0)
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1,
                                         "runtime_env": {"env_vars": KEEP_FREED_MEMORY_ENV}}


def test_replicas_share_a_node_as_many_as_fit_by_their_cpus_and_the_ceiling():
    # 16 logical CPUs: 1-CPU replicas could be 16, the ceiling says 4; 8-CPU replicas fit twice.
    assert ReplicaThreads(max_replicas=4).sharers(16, 1) == 4
    assert ReplicaThreads(max_replicas=4).sharers(16, 8) == 2
    assert ReplicaThreads(max_replicas=4).sharers(4, 8) == 1  # booked more than the node shows
    assert ReplicaThreads(max_replicas=3).sharers(16, 0) == 3  # books no CPU (a GPU replica)
    assert ReplicaThreads(configured=3, max_replicas=4).count() == 3  # a pinned count is taken as is


# --- on the Ray cluster ---------------------------------------------------------------------------


def _post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def http_teacher(serve_port):
    """The teacher started the way a run starts it, on the session's HTTP port."""
    from ray import serve

    cfg = make_cfg(teacher={"serve": {"port": serve_port}, "model": "fake-teacher"})
    handle = start_teacher(cfg, functools.partial(FakeTeacherEngine, latency_s=0.3), name="http-teacher")
    yield cfg, handle, f"http://127.0.0.1:{serve_port}"
    serve.delete("http-teacher")


@pytest.mark.ray
def test_openai_routes_answer_over_http(http_teacher):
    cfg, handle, base = http_teacher
    assert (handle.app_name, handle.deployment_name) == ("http-teacher", DEPLOYMENT_NAME)

    status, chat = _post(
        f"{base}/v1/chat/completions",
        {
            "model": "fake-teacher",
            "messages": [{"role": "user", "content": "Write a review."}],
            "temperature": 0.5,
            "max_tokens": 100,
            "stop": ["\n"],
            "n": 1,
            "user": "ignored-field",
        },
    )
    assert status == 200, chat
    content = chat["choices"][0]["message"]["content"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert content.startswith("a ordinary sample")
    assert chat["usage"]["completion_tokens"] == len(content.split())
    assert chat["choices"][0]["finish_reason"] == "stop"

    status, comp = _post(
        f"{base}/v1/completions", {"model": "fake-teacher", "prompt": "Once", "max_tokens": 3}
    )
    assert status == 200, comp
    assert comp["choices"][0]["text"].startswith("a ordinary sample")
    assert comp["choices"][0]["finish_reason"] == "length"  # 3 tokens asked, more written

    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
        assert json.loads(resp.read())["data"][0]["id"] == cfg.teacher.model

    status, err = _post(
        f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}
    )
    assert status == 400 and "n=1" in err["error"]["message"]
    status, _ = _post(f"{base}/v1/chat/completions", {"model": "fake-teacher"})
    assert status == 422


@pytest.mark.ray
def test_engine_failure_is_an_openai_error_over_http(serve_apps, serve_port):
    cfg = make_cfg()
    serve_apps(
        build_teacher_app(cfg, functools.partial(FakeTeacherEngine, fail_every=1)),
        "failing-teacher",
        route_prefix="/failing",
    )
    status, body = _post(f"http://127.0.0.1:{serve_port}/failing/v1/completions", {"prompt": "Once"})
    assert status == 500
    assert "injected failure" in body["error"]["message"]


@pytest.mark.ray
def test_concurrent_calls_share_engine_batches(http_teacher):
    cfg, handle, _ = http_teacher
    before = len(handle.batch_size_history.remote().result())
    responses = [handle.generate.remote(prompt_to_dict(p)) for p in chat_prompts(12)]
    texts = [r.result().text for r in responses]
    assert len(set(texts)) == 12
    batches = handle.batch_size_history.remote().result()[before:]
    assert sum(batches) == 12
    assert max(batches) > 1  # requests were gathered, not run one by one
    assert max(batches) <= cfg.teacher.batch_size


@pytest.mark.ray
def test_generate_batch_answers_every_request_in_order_in_one_engine_call(http_teacher):
    _, handle, _ = http_teacher
    prompts = chat_prompts(6)
    before = len(handle.batch_size_history.remote().result())
    requests = [{"prompt": json.dumps(prompt_to_dict(p)), "params": {"max_new_tokens": 5}} for p in prompts]
    requests.insert(2, {"prompt": "{not json"})
    requests.insert(4, {"params": {}})
    rows = handle.generate_batch.remote(requests).result()
    assert len(rows) == 8
    assert "malformed request" in rows[2]["teacher_error"] and "malformed request" in rows[4]["teacher_error"]
    good = [r for i, r in enumerate(rows) if i not in (2, 4)]
    assert all(r["teacher_error"] == "" and r["teacher_tokens"] > 0 for r in good)
    # The fake engine echoes the requested label: answers line up with their prompts.
    assert [p.label in r["teacher_text"] for p, r in zip(prompts, good, strict=True)] == [True] * 6
    # Gathered into as few engine calls as the replica's batch cap allows (4 in this fixture).
    assert handle.batch_size_history.remote().result()[before:] == [4, 2]


@pytest.mark.ray
def test_a_replica_computes_on_the_nodes_cores_and_keeps_freed_memory(serve_apps):
    # Ray gives an actor booking half a CPU one torch thread; the replica takes the node's cores
    # (it computes while the run's other stages wait), unless teacher.serve.threads pins a count.
    # It starts with gold_ray.allocator's settings, so its heap serves a 64 MB buffer and keeps it
    # once freed, where glibc's default maps it fresh every time and unmaps it on free. (That the
    # settings then save page faults is tests/test_allocator.py's; counted inside a replica, the
    # faults also count whatever Ray's threads allocate meanwhile: 8 to 12 of 20 buffers, too
    # close to the default's 20 to assert.)
    prompt = {"prompt": json.dumps(prompt_to_dict(chat_prompts(1)[0]))}
    heaps = []
    for threads, expected in ((None, shared_threads(1)), (1, 1)):
        cfg = make_cfg(teacher={"serve": {"num_cpus": 0.5, "threads": threads}})
        handle = serve_apps(build_teacher_app(cfg, ProcessFactsEngine), f"facts-{threads}",
                            route_prefix=f"/facts-{threads}")
        facts = json.loads(handle.generate_batch.remote([prompt]).result()[0]["teacher_text"])
        assert facts["threads"] == expected
        heaps.append(facts["heap"])
    if heaps[0] is None:
        pytest.skip("glibc 2.33+ only (mallinfo2): the threads were checked, the allocator settings were not")
    for heap in heaps:
        assert heap["mapped"] < 64 * 2**20 <= heap["kept"], heap
