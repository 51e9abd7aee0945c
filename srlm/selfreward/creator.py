"""Self-instruction creation for one iteration, and the Callback that runs it between fits.

``InstructionCreator.ensure(model_dir)`` takes M_t (an exported srlm model folder) and finishes
whatever is missing of the iteration's prompts, candidates, judgements and pairs (the next AIFT
set): phases the manifest marks done are skipped, a phase cut short resumes, and the files of the
phases done earlier are checked against the manifest (size, sha256) before they are read
(RunDir.verify). It is idempotent: with every phase done it only verifies.
``SelfRewardCallback`` ends each training phase of the loop: it marks the phase done (so a run
killed during the creation that follows continues with this model) and then calls ``ensure`` with
the freshly exported model. The loop calls ``ensure`` again at the start of each iteration, which
is how a resumed run (or a given M1) reaches the same code.

Under several processes every rank runs ``ensure`` (each generates and judges its share of the fixed
batches, see steps.py) while rank 0 alone writes files and logs; give it a
``distributed.SharedRunDir`` so that every rank sees the phases rank 0 marks done. Generation
runs on its own non-sharded copy of M_t loaded from the exported folder, never on the training
module, so it needs no collective forward.
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch

from srlm.allocator import trim
from srlm.data.datamodule import load_sft_file
from srlm.data.records import write_json, write_jsonl
from srlm.inference.engine import Engine
from srlm.inference.judge import make_judge
from srlm.inference.loading import load_engine, release
from srlm.models.backbone import BackboneConfig
from srlm.models.base import AdapterModule
from srlm.prompts import load_template
from srlm.seeds import derive_seed
from srlm.selfreward import distributed as dist
from srlm.selfreward import steps
from srlm.selfreward.config import SelfRewardConfig
from srlm.selfreward.meta_judge import META_FIELDS, JUDGE_PAIRS, cap_judge_pairs, meta_judge
from srlm.selfreward.pairs import positive_examples
from srlm.selfreward.rundir import RunDir
from srlm.selfreward.select import SELECTION_FILE

log = logging.getLogger(__name__)
PHASES = ("prompts", "candidates", "judgements", "pairs")


def score_histogram(judgements: list[dict]) -> dict[str, int]:
    bins = Counter(int(j["score"] + 0.5) for j in judgements if j.get("score") is not None)
    out = {str(b): bins.get(b, 0) for b in range(6)}
    out["none"] = sum(j.get("score") is None for j in judgements)
    return out


class InstructionCreator:
    def __init__(self, config: SelfRewardConfig, run: RunDir, iteration: int, backbone: BackboneConfig,
                 device: Optional[torch.device] = None, show_progress: bool = True, anchor_dir: Optional[str] = None):
        self.config, self.run_dir, self.t, self.backbone = config, run, iteration, backbone
        self.anchor_dir = anchor_dir  # the model whose samples are rejected (rejected_from m1 or sft)
        self.dir = run.iter_dir(iteration)
        self.device = device or torch.device("cpu")
        self.show_progress = show_progress
        self.summary: dict[str, dict] = {}
        self._loaded: list = []  # the engines ensure loaded, released when it ends

    def phase(self, name: str) -> str:
        return f"iter_{self.t}/{name}"

    def counts(self) -> dict:
        """Each creation phase's counts, as the manifest records them."""
        return {p: self.run_dir.info(self.phase(p)).get("counts", {}) for p in PHASES}

    def complete(self) -> bool:
        """Whether every phase is done; then their files, which the next round trains on, are verified
        (ArtifactChanged if one was changed by hand since its phase wrote it)."""
        done = all(self.run_dir.done(self.phase(p)) for p in PHASES)
        if done:
            self.verify()
        return done

    def verify(self) -> None:
        """Check the files of this iteration's done phases against the manifest (see RunDir.verify)."""
        for p in PHASES:
            self.run_dir.verify(self.phase(p))

    @property
    def seed(self) -> int:
        """This iteration's sampling seed (candidates and judging), from SelfRewardConfig.seed."""
        return derive_seed(self.config.seed, "iteration", self.t)

    def _engine(self, model_dir: Optional[str], seed: Optional[int] = None) -> tuple[Engine, object]:
        # a QLoRA run generates from the same 4-bit model it trains (its reference is that model too)
        b, c = self.backbone, self.config
        loaded = load_engine(b.model_name_or_path, model_dir, batch_size=c.batch_size,
                             seed=self.seed if seed is None else seed, dtype=b.dtype, device=self.device,
                             trust_remote_code=b.trust_remote_code, load_in_4bit=b.load_in_4bit, **c.serving)
        self._loaded.append(loaded)
        return loaded

    def _release(self, engine) -> None:
        """Shut down an engine ``_engine`` loaded, before ``ensure`` ends (one model in memory at a time)."""
        release(engine)
        self._loaded = [loaded for loaded in self._loaded if loaded[0] is not engine]

    def _log(self, name: str, stats: dict) -> None:
        self.summary[name] = stats
        if dist.is_rank0():
            log.info("iter %d %s: %s", self.t, name, ", ".join(f"{k}={v}" for k, v in stats.items()))

    def _anchors(self, prompts: list[dict], judge_engine, tok) -> tuple[list[dict], list[dict], list[Path]]:
        """The anchor model's candidates for this iteration's prompts, judged by M_t (resumable files)."""
        c = self.config
        if self.anchor_dir is None:
            raise ValueError(f"rejected_from: {c.rejected_from} needs that model; none was trained in this run")
        paths = [self.dir / "anchor_candidates.jsonl", self.dir / "anchor_judgements.jsonl"]
        # its own seed: at t = 1 the anchor M1 is M_t itself, and the same seed would repeat M_t's samples
        engine, anchor_tok = self._engine(str(self.anchor_dir), seed=derive_seed(self.seed, "anchor"))
        stats = steps.generate_candidates(engine, anchor_tok, prompts, paths[0], n=c.num_candidates,
                                          sampling=c.candidate_sampling, show_progress=self.show_progress, tag="a")
        self._log("anchor candidates", stats)
        self._release(engine)
        anchors = steps.existing(paths[0])
        judge = make_judge(c.judging, judge_engine, tok, load_template(c.judge_template, "question", "response"),
                           c.judge_samples, c.judge_sampling)
        stats = steps.judge_candidates(judge, anchors, paths[1], seed=self.seed, show_progress=self.show_progress)
        self._log("anchor judgements", stats)
        return anchors, steps.existing(paths[1]), paths

    def ensure(self, model_dir: str | Path) -> dict:
        """Finish whatever is missing of this iteration's AIFT data, with M_t from ``model_dir`` (loaded only when
        something is missing); returns the per-phase summaries."""
        if self.complete():
            return self.counts()
        model_dir = str(model_dir)
        gc.collect()  # at the end of a fit: its freed activations go back to the system before an engine loads
        trim()
        dist.barrier()  # rank 0 has exported M_t
        self.dir.mkdir(parents=True, exist_ok=True)
        self.verify()  # the files of phases done earlier are read below: they must be the recorded ones
        files = {p: self.dir / f"{p}.jsonl" for p in PHASES}
        try:
            self._create(model_dir, files)
        finally:  # every engine this call loaded is shut down: a vLLM engine's memory returns before the next fit
            for engine, _ in list(self._loaded):
                self._release(engine)
        summary = self.counts()
        if dist.is_rank0():
            write_json(self.dir / "metrics.json", {"iteration": self.t, "model": model_dir, **summary})
        return summary

    def _create(self, model_dir: str, files: dict) -> None:
        """The phases ``ensure`` finds missing, in order."""
        c = self.config
        current = None
        if not self.run_dir.done(self.phase("prompts")):
            seed_prompts = [ex.prompt for ex in load_sft_file(c.seed_prompts_file)]
            engine, tok = self._engine(None if c.prompt_model == "base" else model_dir)
            if c.prompt_model != "base":
                current = (engine, tok)
            stats = steps.generate_prompts(engine, tok, seed_prompts, load_template(c.prompt_template, "examples"),
                                           files["prompts"], target=c.num_prompts, max_requests=c.max_requests,
                                           few_shot=c.few_shot, sampling=c.prompt_sampling,
                                           seed=derive_seed(c.seed, "prompts", self.t), id_prefix=f"t{self.t}-p",
                                           requests_per_batch=c.batch_size,
                                           show_progress=self.show_progress)
            self._log("prompts", stats)
            self.run_dir.mark_done(self.phase("prompts"), stats, [files["prompts"]])
            if current is None:
                self._release(engine)  # the base model's: one model in memory at a time
        prompts = steps.existing(files["prompts"])
        if not self.run_dir.done(self.phase("candidates")):
            current = current or self._engine(model_dir)
            stats = steps.generate_candidates(*current, prompts, files["candidates"], n=c.num_candidates,
                                              sampling=c.candidate_sampling, show_progress=self.show_progress)
            self._log("candidates", stats)
            self.run_dir.mark_done(self.phase("candidates"), stats, [files["candidates"]])
        candidates = steps.existing(files["candidates"])
        if not self.run_dir.done(self.phase("judgements")):
            engine, tok = current = current or self._engine(model_dir)
            judge = make_judge(c.judging, engine, tok, load_template(c.judge_template, "question", "response"),
                               c.judge_samples, c.judge_sampling)
            stats = steps.judge_candidates(judge, candidates, files["judgements"], seed=self.seed,
                                           show_progress=self.show_progress)
            stats["histogram"] = score_histogram(steps.existing(files["judgements"]))
            self._log("judgements", stats)
            self.run_dir.mark_done(self.phase("judgements"), stats, [files["judgements"]])
        judgements = steps.existing(files["judgements"])
        if not self.run_dir.done(self.phase("pairs")):
            anchors, anchor_files = [], []
            if c.rejected_from != "current":
                engine, tok = current = current or self._engine(model_dir)
                anchors, anchor_judgements, anchor_files = self._anchors(prompts, engine, tok)
                judgements = judgements + anchor_judgements
            stats = steps.make_pairs(candidates, judgements, files["pairs"], min_margin=c.min_margin, anchors=anchors,
                                     allow_unfinished_chosen=c.allow_unfinished_chosen,
                                     length_control=c.length_control)
            written = [files["pairs"]] + anchor_files
            if anchors:  # anchored rejection: where the rejected answers came from, for metrics.json and the report
                anchor_ids = {a["id"] for a in anchors}
                stats["anchor"] = {"rejected_from": c.rejected_from, "candidates": len(anchors),
                                   "histogram": score_histogram(anchor_judgements),
                                   "pairs_rejecting_anchor": sum(p["rejected_id"] in anchor_ids
                                                                 for p in steps.existing(files["pairs"]))}
            if c.positive_only:
                scores = {j["id"]: j["score"] for j in judgements}
                positives = positive_examples([{**cand, "candidate_id": cand["id"], "score": scores.get(cand["id"])}
                                               for cand in candidates], min_score=c.positive_min_score)
                stats["positive_examples"] = len(positives)
                if dist.is_rank0():
                    write_jsonl(self.dir / "positives.jsonl", positives)
                written.append(self.dir / "positives.jsonl")
            if c.meta_judge:
                engine, tok = current = current or self._engine(model_dir)
                judge_pairs, meta = meta_judge(engine, tok, load_template(c.meta_judge_template, *META_FIELDS),
                                               load_template(c.judge_template, "question", "response"), candidates,
                                               judgements)
                kept = cap_judge_pairs(judge_pairs, stats["pairs"], c.meta_judge_share, self.seed)
                stats["meta_judge"] = {**meta, "judge_pairs": len(kept), "judge_pairs_before_cap": len(judge_pairs)}
                if dist.is_rank0():
                    write_jsonl(self.dir / JUDGE_PAIRS, kept)
                written.append(self.dir / JUDGE_PAIRS)
            self._log("pairs", stats)
            self.run_dir.mark_done(self.phase("pairs"), stats, written)


class SelfRewardCallback(L.Callback):
    """Ends a training phase of the loop: marks it done in the run manifest with its counts (and the checkpoint
    selection's choice), then, given a creator, creates the next iteration's training data with the model
    this fit exported. One callback does both, in this order: a run killed during the creation continues with
    this model, and never fits another M_t whose candidates would be judged beside the first one's."""

    def __init__(self, run: RunDir, phase: str, counts: Callable[[L.Trainer], dict],
                 creator: Optional[InstructionCreator] = None):
        self.run, self.phase, self.counts, self.creator = run, phase, counts, creator
        self.summary: Optional[dict] = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = {**self.counts(trainer), "steps": trainer.global_step}
        chosen = Path(trainer.default_root_dir) / SELECTION_FILE  # written by SelectBest when the phase selects
        if chosen.exists():
            summary = json.loads(chosen.read_text(encoding="utf-8"))
            counts["selection"] = {k: summary.get(k) for k in ("metric", "best_step", "best_value", "final_step",
                                                               "final_value")}
        self.run.mark_done(self.phase, counts)
        if isinstance(pl_module, AdapterModule):
            pl_module.unload()  # exported in on_train_end: the creation below loads M_t from there, one copy is enough
        if self.creator is not None:
            self.creator.device = pl_module.device
            self.creator.show_progress = trainer.is_global_zero
            self.summary = self.creator.ensure(pl_module.exported_to or pl_module.export_path())
