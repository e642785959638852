"""``gold-ray serve CONFIG`` hosts the teacher alone behind the OpenAI-compatible routes."""

import json
import urllib.request

import pytest

from gold_ray.cli import main
from gold_ray.testing import save_tiny_chat_lm

pytestmark = pytest.mark.ray


def test_serve_command_answers_chat_completions(ray_cluster, serve_port, tmp_path, capsys):
    from ray import serve

    teacher = save_tiny_chat_lm(tmp_path / "teacher")
    rc = main(["serve", "tiny", "--once", "--set", f"teacher.model={teacher}", "--set",
               f"teacher.serve.port={serve_port}", "--set", "teacher.serve.num_cpus=0.25",
               "--set", "teacher.max_new_tokens=5"])
    try:
        assert rc == 0
        assert f"http://127.0.0.1:{serve_port}/v1" in capsys.readouterr().out
        body = json.dumps({"model": "teacher", "messages": [{"role": "user", "content": "Write a review."}],
                           "max_tokens": 5}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.load(resp)
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert 0 < answer["usage"]["completion_tokens"] <= 5
    finally:
        serve.delete("teacher")
