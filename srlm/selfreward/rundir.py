"""One folder per run: per-iteration artifacts, a manifest with counts and hashes, phase marks.

    run_dir/
      config.yaml            the configuration the run was started with
      manifest.json          phases done (atomically marked), their counts, their files' sizes and sha256
      m1/                    SFT phase: lightning_logs/ (metrics.csv), checkpoints/, model/ (peft adapter)
      iter_1/                prompts.jsonl, candidates.jsonl, judgements.jsonl, pairs.jsonl, metrics.json,
                             dpo/ (logs, checkpoints), model/ (M2's adapter)
      report.md

A resume checks a done phase's files against the manifest before they are used (``verify``): a file
edited, truncated or deleted by hand stops the run (``ArtifactChanged``) unless the run was started
with ``force``, which accepts the files as they are and records them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from srlm.data.records import write_json

log = logging.getLogger(__name__)


class RunConfigMismatch(RuntimeError):
    pass


class ArtifactChanged(RuntimeError):
    """A done phase's file is no longer the one its phase recorded in the manifest."""


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def file_record(path: Path) -> dict:
    """What the manifest keeps of an artifact: its size (checked first, cheaply), sha256 and record count."""
    return {"sha256": file_hash(path), "records": count_lines(path), "bytes": Path(path).stat().st_size}


def _difference(path: Path, recorded: dict) -> Optional[str]:
    """How ``path`` differs from its manifest record, or None when it is the same file."""
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if recorded.get("bytes") is not None and size != recorded["bytes"]:
        return f"{size} bytes, {recorded['bytes']} recorded"
    if file_hash(path) != recorded.get("sha256"):
        return "same size, different sha256" if recorded.get("bytes") is not None else "different sha256"
    return None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] = (json.loads(self.manifest_path.read_text()) if self.manifest_path.exists()
                                         else {"phases": {}})
        self.force = False  # set by claim: accept changed artifacts too
        self._verified: set[str] = set()  # phases whose files were checked by this process

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
        self.force = force
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
            entry["files"] = {str(Path(f).relative_to(self.root)): file_record(Path(f))
                              for f in files if Path(f).exists()}
        self.manifest["phases"][phase] = entry
        self._verified.add(phase)
        self.save()

    def verify(self, phase: str) -> None:
        """Check that the files a done phase recorded are still those files (size first, then sha256).

        A changed or truncated file raises ArtifactChanged naming the file, the phase and the remedies; with
        ``force`` (claim's) it is accepted with a warning and its new size, hash and count are recorded. A
        missing file is never accepted. Each phase is checked once per process.
        """
        if phase in self._verified or not self.done(phase):
            return
        recorded = self.info(phase).get("files", {})
        changed = {name: why for name, meta in recorded.items() if (why := _difference(self.root / name, meta))}
        for name, why in changed.items():
            path = self.root / name
            if why == "missing" or not self.force:
                remedy = ("" if why == "missing" else ", or rerun with --force true to accept the file as it is "
                          "(it is then recorded as the phase's output)")
                raise ArtifactChanged(
                    f"{path} is not the file phase '{phase}' recorded in {self.manifest_path} ({why}): it was "
                    f"edited, truncated or deleted since. To redo the phase, delete its files "
                    f"({', '.join(sorted(recorded))}) and its entry '{phase}' under \"phases\" in "
                    f"{self.manifest_path.name} (and the entries of the phases made from it){remedy}")
            log.warning("%s changed since phase '%s' recorded it (%s): accepted (force)", path, phase, why)
            recorded[name] = {**file_record(path), "accepted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if changed:
            self.save()
        self._verified.add(phase)

    def save(self) -> None:
        write_json(self.manifest_path, self.manifest)
