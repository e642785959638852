"""Teacher calls whose prompts share a prefix go to one Serve replica.

Prompts of one demo set (``teacher.prompts_per_demo_set``) begin with the same instructions and
demonstrations; a replica that has just run that prefix has it in its engine's cache (vLLM's
prefix caching) or runs it once per batch (the ``hf`` engine), a replica that has not must
compute it again. So the pipeline's caller sends each batch call with the key of the prefix most
of its prompts share (:func:`call_prefix_key`, from ``Prompt.meta["prefix_key"]``), and
:class:`PrefixAffinityRouter`, the teacher deployment's request router, sends every call of a key
to the same replica: the replica that ranks first for that key by rendezvous hashing
(highest-random-weight), so keys spread evenly over the replicas, and a replica that comes or goes
moves only its own keys. A call without a key, or whose replica is full, goes where Serve's
default router would send it (the least loaded of the others).

Why not Ray Serve LLM's ``PrefixCacheAffinityRouter``: it reads the prompt text from ``prompt`` or
``messages`` attributes of an OpenAI request object, and the pipeline's calls carry lists of
prompt dicts (:meth:`actors.teacher.TeacherDeployment.generate_batch`); it also needs the
``ray[llm]`` dependencies.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PREFIX_KEY_KWARG = "prefix_key"
"""The keyword argument of a teacher call that names its prompts' shared prefix."""


def call_prefix_key(prompt_jsons: Iterable[str | dict[str, Any]]) -> str | None:
    """The prefix key most of a call's prompts share (the first such on a tie), or None without keys.

    Args:
        prompt_jsons: The call's prompts as :func:`actors.teacher.prompt_to_dict` dicts or their JSON.
    """
    keys = []
    for p in prompt_jsons:
        data = json.loads(p) if isinstance(p, str) else p
        key = (data.get("meta") or {}).get("prefix_key")
        if key:
            keys.append(str(key))
    return Counter(keys).most_common(1)[0][0] if keys else None


def affinity(key: str, replica_id: str) -> int:
    """The rendezvous weight of ``replica_id`` for ``key``: the highest weight wins the key."""
    return int.from_bytes(hashlib.sha256(f"{key}|{replica_id}".encode()).digest()[:8], "big")


class PrefixAffinityRouter(RequestRouter):
    """Serve request router of the teacher deployment: one replica per prefix key (see the module)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The key's replica first, every other replica next (Serve takes the least loaded there)."""
        key = (pending_request.kwargs or {}).get(PREFIX_KEY_KWARG) if pending_request is not None else None
        if not key or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: affinity(str(key), r.replica_id.unique_id), reverse=True)
        return [ranked[:1], ranked[1:]]
