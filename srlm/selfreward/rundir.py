"""One folder per run: per-iteration artifacts, a manifest with counts and hashes, phase marks.

    run_dir/
      config.yaml            the configuration the run was started with
      manifest.json          phases done (atomically marked), their counts, file hashes
      m1/                    SFT phase: lightning_logs/ (metrics.csv), checkpoints/, model/ (peft adapter)
      iter_1/                prompts.jsonl, candidates.jsonl, judgements.jsonl, pairs.jsonl, metrics.json,
                             dpo/ (logs, checkpoints), model/ (M2's adapter)
      report.md
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

from srlm.data.records import write_json


class RunConfigMismatch(RuntimeError):
    pass


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] = (json.loads(self.manifest_path.read_text()) if self.manifest_path.exists()
                                         else {"phases": {}})

    def iter_dir(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def claim(self, config_text: str, world_size: int, force: bool = False) -> None:
        """Start or resume the run; refuse a different config or world size unless forced."""
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(config_text.encode()).hexdigest()
        old = self.manifest.get("config_sha256")
        if old and old != digest and not force:
            raise RunConfigMismatch(
                f"{self.root} was started with a different configuration (see {self.root / 'config.yaml'}); "
                "rerun with the same config to resume, choose another --run_dir, or pass --force true to continue anyway")
        old_world = self.manifest.get("world_size")
        if old_world and old_world != world_size and self.manifest["phases"] and not force:
            raise RunConfigMismatch(f"{self.root} was started with {old_world} processes, this run has {world_size}: "
                                    "resume with the same number of devices")
        self.manifest.update(config_sha256=digest, world_size=world_size)
        (self.root / "config.yaml").write_text(config_text)
        self.save()

    def done(self, phase: str) -> bool:
        return bool(self.manifest["phases"].get(phase, {}).get("done"))

    def info(self, phase: str) -> dict:
        return self.manifest["phases"].get(phase, {})

    def mark_done(self, phase: str, counts: dict, files: Optional[list[Path]] = None) -> None:
        entry = {"done": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": counts}
        if files:
            entry["files"] = {str(Path(f).relative_to(self.root)): {"sha256": file_hash(f), "records": count_lines(f)}
                              for f in files if Path(f).exists()}
        self.manifest["phases"][phase] = entry
        self.save()

    def save(self) -> None:
        write_json(self.manifest_path, self.manifest)
