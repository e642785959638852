"""``gold-ray serve CONFIG`` hosts the teacher alone behind the OpenAI-compatible routes, on loopback."""

import json
import socket
import urllib.request

import pytest

from gold_ray.cli import main
from tests.raykit import external_ipv4, listening_hosts

pytestmark = pytest.mark.ray


def test_serve_command_answers_chat_completions_on_loopback_only(ray_cluster, serve_port, tiny_chat_lm, capsys):
    from ray import serve

    rc = main(["serve", "tiny", "--once", "--set", f"teacher.model={tiny_chat_lm}", "--set",
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
        # The real sockets: what listens on the port is bound to loopback only (the default host),
        # and the machine's other address refuses the connection.
        assert listening_hosts(serve_port) == {"127.0.0.1"}
        if (address := external_ipv4()) is not None:
            with pytest.raises(ConnectionRefusedError), socket.create_connection((address, serve_port), timeout=10):
                pass
    finally:
        serve.delete("teacher")
