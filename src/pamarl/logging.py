"""Run logging: ``metrics.csv`` (always), TensorBoard event files (optional), same keys in both.

Each evaluation's episodes (team return and cost of every episode, not just their mean) go to
``eval_episodes.jsonl``, one JSON object per evaluation: ``{"iteration", "env_steps", "returns",
"costs"?}``. Metrics such as the constraint satisfaction rate are computed from it (``pamarl compare``).

One CSV row per iteration. Columns appear as keys first appear (evaluation columns on the first
evaluation row, say); the file is then rewritten with the wider header, atomically, so it is a valid
CSV at every moment. String values (e.g. ``sched/critical = "2;0"``) go to the CSV and to
TensorBoard as text.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

FIRST_COLUMNS = ["iteration", "env_steps", "wall_s"]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a truncated last line (a crash mid-write) is ignored."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class MetricsLogger:
    """Append-only metrics log over CSV and TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_iteration: int | None = None):
        self.path = run_dir / "metrics.csv"
        self.columns: list[str] = list(FIRST_COLUMNS)
        self.rows: list[dict[str, Any]] = []
        if resume_iteration is not None and self.path.exists():
            # Rows logged after the checkpoint belong to the interrupted attempt: drop them.
            old = read_csv(self.path)
            self.rows = [r for r in old if int(r["iteration"]) <= resume_iteration]
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            self.columns = header or self.columns
            self._rewrite()
        self.episodes_path = run_dir / "eval_episodes.jsonl"
        if resume_iteration is not None and self.episodes_path.exists():
            keep = [ln for ln in read_jsonl(self.episodes_path) if int(ln["iteration"]) <= resume_iteration]
            atomic_write_text(self.episodes_path, "".join(json.dumps(ln) + "\n" for ln in keep))
        elif resume_iteration is None and self.episodes_path.exists():
            self.episodes_path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_iteration is None else resume_iteration + 1
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                self.tb = None

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow(r)
        atomic_write_text(self.path, buf.getvalue())

    @staticmethod
    def _fmt(v: Any) -> Any:
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else str(v)
        return v

    def log(self, raw: dict[str, Any]) -> None:
        row = {k: self._fmt(v) for k, v in raw.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n").writerow(row)
        if self.tb is not None:
            step = int(raw.get("env_steps", len(self.rows)))
            for k, v in raw.items():
                if k == "iteration":
                    continue
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self.tb.add_scalar(k, float(v), step)
                elif isinstance(v, str):
                    self.tb.add_text(k, v, step)

    def log_eval_episodes(self, iteration: int, env_steps: int, episodes: dict[str, list[float]]) -> None:
        """Append one evaluation's per-episode returns (and costs) to ``eval_episodes.jsonl``."""
        line = {"iteration": iteration, "env_steps": env_steps, **episodes}
        with open(self.episodes_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
