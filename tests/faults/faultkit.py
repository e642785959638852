"""Helpers of the fault tests: small run configs, deterministic engines, a scripted HTTP endpoint.

Nothing here imports Ray, so the fast fault tests stay fast; what the Ray tests share (the held
engine of the fault tests included) lives in :mod:`tests.raykit`. Import this module as
``tests.faults.faultkit``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gold_ray.config import RunConfig, load_config
from gold_ray.run.store import read_parts
from gold_ray.testing import FakeTeacherEngine
from gold_ray.types import Generation, Prompt, SamplingParams

GARBAGE_KINDS = ("empty", "binary", "huge", "echo", "other_label", "json")
"""What a broken teacher sends back, besides good samples."""


def run_overrides(run_dir: Path, student: str, eval_file: Path, *extra: str) -> list[str]:
    """``--set`` overrides of a small in-process GOLD run (2 iterations, 32 samples, tiny student)."""
    return [
        "task.name=sst2", f"task.eval_path={eval_file}", f"student.model={student}",
        "teacher.model=fake", "teacher.prompt_style=chat", "budget.samples=32", "strategy.iterations=2",
        "strategy.probe_fraction=0.5", "student.final_epochs=1", "student.batch_size=8",
        f"output.dir={run_dir}", "tracking.enabled=false", *extra,
    ]


def run_config(run_dir: Path, student: str, eval_file: Path, *extra: str) -> RunConfig:
    """The :func:`run_overrides` run as a config."""
    return load_config(None, run_overrides(run_dir, student, eval_file, *extra))


def write_data_dir(root: Path, pairs: int, verb: str = "reads as") -> Path:
    """A ``$GOLD_RAY_DATA``-like folder for SST-2; returns ``root``.

    ``sst2/seed.jsonl`` holds ``2 * pairs`` labelled reviews, positive and negative in turn (LLKD's
    unlabelled texts, S3's real validation set); ``sst2/test.jsonl`` the same rows with "test "
    before each text (the evaluation set).
    """
    (root / "sst2").mkdir(parents=True)
    rows = [{"text": f"real review number {i} {verb} {lab} about the film", "label": lab}
            for i, lab in enumerate(["positive", "negative"] * pairs)]
    (root / "sst2" / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sst2" / "test.jsonl").write_text("".join(json.dumps({**r, "text": "test " + r["text"]}) + "\n"
                                                      for r in rows))
    return root


def write_eval_file(path: Path, n: int = 12, text: str = "film number {i} was {review}") -> Path:
    """A small SST-2 style evaluation JSONL: ``n`` rows, negative and positive in turn (row 0 negative).

    Args:
        path: File to write.
        n: Rows.
        text: Each row's text, formatted with ``i`` (the row), ``label`` and ``review`` ("great
            fun" or "a dull mess", by label).
    """
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        review = "great fun" if i % 2 else "a dull mess"
        rows.append({"text": text.format(i=i, label=label, review=review), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _bucket(prompt: Prompt, salt: str, n: int) -> int:
    uid = str(prompt.meta.get("uid", ""))
    return int(hashlib.sha256(f"{salt}|{uid}".encode()).hexdigest()[:8], 16) % n


def _request_text(prompt: Prompt) -> str:
    if prompt.messages:
        return str(prompt.messages[-1]["content"])
    return prompt.text or ""


def garbage_answer(kind: str, prompt: Prompt) -> str:
    """One kind of broken teacher output for ``prompt``."""
    other = "negative" if prompt.label == "positive" else "positive"
    return {
        "empty": "",
        "binary": "\x00\x01\x02\xff\xfe\x1b[2J" * 8,
        "huge": "an endless review " * 6000,  # about 100 KB
        "echo": _request_text(prompt),
        "other_label": f"Label: {other}",
        "json": json.dumps({"text": "A warm film with a fine cast and a clever plot.", "label": other}),
    }[kind]


class SometimesGarbageEngine(FakeTeacherEngine):
    """The fake engine, except that some prompts get a broken answer, chosen by the prompt's uid.

    Which prompts get garbage depends only on the prompt (not on call order), so a resumed run
    sees exactly the answers of an uninterrupted one.

    Args:
        share: About this share of prompts gets garbage (in steps of 1/8).
        kinds: Garbage kinds to draw from (see :data:`GARBAGE_KINDS`).
    """

    def __init__(self, share: float = 0.25, kinds: tuple[str, ...] = GARBAGE_KINDS, **kw: Any):
        super().__init__(**kw)
        self.cut = round(share * 8)
        self.kinds = kinds
        self.given: dict[str, str] = {}

    def kind_for(self, prompt: Prompt) -> str | None:
        """The garbage kind ``prompt`` gets, or None for a good answer."""
        if _bucket(prompt, "garbage", 8) >= self.cut:
            return None
        return self.kinds[_bucket(prompt, "kind", len(self.kinds))]

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Good answers from the fake engine, garbage where :meth:`kind_for` says so."""
        good = super().generate(prompts, params)
        out = []
        for prompt, gen in zip(prompts, good, strict=True):
            kind = self.kind_for(prompt)
            self.given[str(prompt.meta.get("uid"))] = kind or "good"
            if kind is None:
                out.append(gen)
            else:
                text = garbage_answer(kind, prompt)
                out.append(Generation(text=text, output_tokens=len(text.split())))
        return out


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (what "nothing was touched" means)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def committed_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of every part that the committed state lists."""
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    return read_parts([run_dir / p for p in state["parts"]])


def run_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What must not change when a run is interrupted and resumed: counts and feedback."""
    its = metrics["iterations"]
    return {
        "totals": metrics["totals"],
        "requested": [(m["generate"]["requested"], m["probe"]["requested"]) for m in its],
        "rejected": [(m["generate"]["rejected_by_reason"], m["probe"]["rejected_by_reason"]) for m in its],
        "feedback": [m["feedback"]["ids"] for m in its],
        "final_records": metrics["final"]["records"],
    }


# --- a scripted OpenAI-compatible endpoint ----------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        srv: ScriptedEndpoint = self.server.owner  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        action = srv.next_action(self.path, body, self.headers.get("Authorization"))
        try:
            kind = action[0]
            if kind == "sleep":
                time.sleep(action[1])
                action = ("ok", "A calm, well acted film about a long summer.")
                kind = "ok"
            if kind == "status":
                code, headers = action[1], (action[2] if len(action) > 2 else {})
                self._send(code, json.dumps({"error": {"message": "try later"}}).encode(), headers)
            elif kind == "raw":
                self._send(200, action[1], {})
            else:
                text = action[1]
                if "messages" in body:
                    payload = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                else:
                    payload = {"choices": [{"text": text}]}
                payload["usage"] = {"completion_tokens": len(text.split())}
                self._send(200, json.dumps(payload).encode(), {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def _send(self, code: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class ScriptedEndpoint:
    """A real local HTTP server speaking the OpenAI completion routes, answering from a script.

    Actions: ``("ok", text)``, ``("status", code[, headers])``, ``("sleep", seconds)`` (then ok),
    ``("raw", bytes)`` (a 200 reply that is not JSON). ``script`` is consumed first, then
    ``default`` answers every request.
    """

    def __init__(self, default: tuple = ("ok", "A calm, well acted film about a long summer.")):
        self.default = default
        self.script: list[tuple] = []
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def next_action(self, path: str, body: dict[str, Any], auth: str | None = None) -> tuple:
        """Record the request and pop the next action."""
        with self.lock:
            self.seen.append({"t": time.monotonic(), "path": path, "body": body, "auth": auth})
            return self.script.pop(0) if self.script else self.default


@contextmanager
def scripted_endpoint(default: tuple | None = None) -> Iterator[ScriptedEndpoint]:
    """Run a :class:`ScriptedEndpoint` in a thread for the duration of the block."""
    srv = ScriptedEndpoint(default) if default is not None else ScriptedEndpoint()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        thread.join(timeout=5)
