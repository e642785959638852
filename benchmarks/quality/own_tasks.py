"""The benchmark's own tasks (``tasks/*.yaml``) and their evaluation files, written under a data folder.

A newcomer's labelled data rarely has the task's field names; this is the small conversion a user
writes once. ``math_ops`` reads SVAMP's questions and answer types from the data folder
(``$GOLD_RAY_DATA/svamp/test.jsonl``) and writes ``<out>/math_ops/test.jsonl`` with ``text`` and
``label``. SVAMP spells one "Common-Division" as "Common-Divison"; both become ``division``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
MATH_OPS_LABELS = {"Addition": "addition", "Subtraction": "subtraction", "Multiplication": "multiplication",
                   "Common-Division": "division", "Common-Divison": "division"}


def benchmark_tasks() -> dict[str, Path]:
    """The benchmark's own task files by name."""
    return {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}


def prepare_math_ops(out_dir: Path, data_dir: Path) -> Path:
    """Write ``out_dir/math_ops/test.jsonl`` from ``data_dir/svamp/test.jsonl``; return its path."""
    src = data_dir / "svamp" / "test.jsonl"
    dst = out_dir / "math_ops" / "test.jsonl"
    rows = []
    for lineno, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("type") not in MATH_OPS_LABELS:
            raise ValueError(f"{src}:{lineno}: answer type {record.get('type')!r} is not one of {sorted(MATH_OPS_LABELS)}")
        rows.append({"text": record["question"], "label": MATH_OPS_LABELS[record["type"]], "id": record.get("id")})
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(dst)
    return dst


PREPARERS = {"math_ops": prepare_math_ops}


def prepare(task: str, out_dir: Path) -> Path:
    """Prepare ``task``'s evaluation file under ``out_dir`` (the run's ``task.data_dir``)."""
    data = os.environ.get("GOLD_RAY_DATA")
    if not data:
        raise SystemExit(f"task {task!r} prepares its evaluation file from $GOLD_RAY_DATA, which is not set")
    return PREPARERS[task](out_dir, Path(data))
