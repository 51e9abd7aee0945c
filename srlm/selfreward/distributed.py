"""Ranks for the self-instruction steps and the loop: who generates what, who writes, and when to wait.

Everything here also works when ``torch.distributed`` is not initialised (one process): the rank is
0, the world has size 1, a gather returns ``[obj]`` and barriers return at once. Under DDP the work of
a generation step is split over the ranks and the records are gathered to every rank (so that all
ranks keep the same state and make the same decisions), while only rank 0 writes files.

``SharedRunDir`` is the run folder as seen by several ranks: rank 0 writes the manifest and every
rank takes rank 0's copy after each change. ``ensure_process_group`` starts the other ranks and the
process group at the start of the loop, before any fit (Lightning would otherwise only do it on
the first ``fit``, and the creation step may run outside a fit when a run resumes).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Optional

import torch.distributed as torch_dist

from srlm.selfreward.rundir import RunConfigMismatch, RunDir

log = logging.getLogger(__name__)


def initialised() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if initialised() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if initialised() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch_dist.barrier()


def all_gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_rank0() else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def mine(number: int) -> bool:
    """Whether this rank runs the fixed batch ``number`` (batch k goes to rank k % world)."""
    return number % world_size() == rank()


class RoundGather:
    """Brings every rank's rows of a step to every rank, one collective per unit of work.

    Each rank calls ``step(rows)`` once per batch it ran and ``finish()`` after its last one;
    ``finish`` keeps joining the collective (with no rows) until every rank has finished, so ranks
    with fewer batches never leave the others waiting in a collective. ``on_rows(rows)`` is called on
    every rank with each rank's rows, in rank order within a round.
    """

    def __init__(self, on_rows: Callable[[list], None]):
        self.on_rows = on_rows

    def _round(self, rows: list, finished: bool) -> bool:
        everyone = all_gather((finished, rows))
        for _, theirs in everyone:
            if theirs:
                self.on_rows(theirs)
        return all(done for done, _ in everyone)

    def step(self, rows: list) -> None:
        if world_size() == 1:
            self.on_rows(rows)
        else:
            self._round(rows, False)

    def finish(self) -> None:
        if world_size() == 1:
            return
        while not self._round([], True):
            pass


class NullWriter:
    """Stands for a JsonlAppender on the ranks that do not write."""

    def write(self, record: Any) -> None:
        pass

    def write_many(self, records: Iterable[Any]) -> None:
        pass

    def __enter__(self) -> "NullWriter":
        return self

    def __exit__(self, *exc) -> None:
        pass


def appender(path):
    """A JsonlAppender on rank 0 (opening one may cut a torn line: one rank only), a NullWriter elsewhere."""
    from srlm.data.records import JsonlAppender

    return JsonlAppender(path) if is_rank0() else NullWriter()


def on_rank0(fn: Callable) -> Callable:
    """Decorator for ``fn(run, ...)`` that writes into the run folder: rank 0 runs it (its manifest
    changes stay local meanwhile), then every rank takes rank 0's manifest and return value, or its error."""

    @functools.wraps(fn)
    def wrapper(run, *args, **kwargs):
        if not isinstance(run, SharedRunDir) or world_size() == 1:
            return fn(run, *args, **kwargs)
        result, error = None, None
        if is_rank0():
            run.local = True
            try:
                result = fn(run, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                error = err
            finally:
                run.local = False
        return run.sync(result, error)

    return wrapper


class SharedRunDir(RunDir):
    """A RunDir that rank 0 writes; after each change every rank takes rank 0's manifest, so that all
    ranks skip and resume the same phases. Every rank makes the same calls (they are collectives)."""

    local = False  # inside an on_rank0 function: rank 0 alone runs, no collectives

    def sync(self, result: Any = None, error: Optional[BaseException] = None) -> Any:
        """Rank 0's manifest (and ``result``) on every rank; rank 0's ``error`` raised on every rank."""
        if world_size() > 1 and not self.local:
            self.manifest, result, error = broadcast((self.manifest, result, error))
        if error is not None:
            raise error
        return result

    def claim(self, config_text: str, world_size: int, force: bool = False) -> None:
        self.force = force  # every rank: each one checks the artifacts it reads (RunDir.verify)
        error = None
        if is_rank0():
            try:
                super().claim(config_text, world_size, force)
            except RunConfigMismatch as err:
                error = err
        self.sync(error=error)

    def mark_done(self, phase: str, counts: dict, files=None) -> None:
        if is_rank0():
            super().mark_done(phase, counts, files)
        self.sync()

    def save(self) -> None:
        if is_rank0():
            super().save()  # no sync here: claim and mark_done call save on rank 0 alone


def check_loop_strategy(trainer) -> None:
    """Refuse strategies the loop cannot run under, before it starts.

    Generation runs on a separate, unsharded copy of M_t loaded from its exported folder, and the
    export gathers the full weights first when they are sharded (``AdapterModule.export``). FSDP2
    (``ModelParallelStrategy``, configs/strategies/fsdp.yaml) does that; Lightning's FSDP1
    (``FSDPStrategy``) wraps the whole LightningModule, and DeepSpeed ZeRO-3 partitions parameters
    outside torch's view: for these the gathering is not implemented, so the loop refuses them.
    """
    name = type(trainer.strategy).__name__
    stage = getattr(trainer.strategy, "config", None) or {}
    stage = stage.get("zero_optimization", {}).get("stage", 0) if isinstance(stage, dict) else 0
    if name.startswith("FSDP") or (name.startswith("DeepSpeed") and stage >= 3):
        raise ValueError(f"the self-rewarding loop cannot run under {name}{f' stage {stage}' if stage else ''}: it "
                         "shards the weights in a way srlm's export does not gather. Use FSDP2 "
                         "(--config configs/strategies/fsdp.yaml: ModelParallelStrategy), --trainer.strategy=ddp "
                         "or deepspeed_stage_2 (see configs/strategies)")


def ensure_process_group(trainer) -> None:
    """Start the other ranks and the process group now, for a loop under a multi-process strategy.

    With Lightning's subprocess launcher (``strategy: ddp`` and friends) rank 0 relaunches the same
    command for the other local ranks, with ``LOCAL_RANK`` in their environment, and sets
    ``LOCAL_RANK=0`` in its own: every Trainer made later in this process (one per loop phase) then
    finds its processes already created and the process group already initialised, and reuses both.
    Launchers that spawn a function in new processes (``ddp_spawn``, notebooks) cannot run the loop.
    """
    from lightning.pytorch.strategies import ParallelStrategy
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    strategy = trainer.strategy
    if not isinstance(strategy, ParallelStrategy) or strategy.world_size <= 1 or initialised():
        return
    launcher = strategy.launcher
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        raise ValueError(f"the loop runs each phase on a new Trainer in the same processes: strategy "
                         f"'{type(strategy).__name__}' with {type(launcher).__name__} cannot do that; use "
                         "--trainer.strategy=ddp (one process per device, launched by Lightning or torchrun)")
    if launcher is not None:
        launcher.launch(lambda: None)  # rank 0: start the other local ranks (a no-op when launched externally)
    if "ModelParallel" in type(strategy).__name__:
        # its setup_environment also builds the device mesh for a LightningModule that is not attached
        # yet: start the process group alone here; each phase's fit builds the mesh.
        strategy._setup_distributed()
    else:
        strategy.setup_environment()  # device, ranks, process group
    log.info("rank %d of %d ready", rank(), world_size())
    if not is_rank0():  # the other ranks repeat rank 0's messages and bars: errors only
        import transformers

        logging.getLogger("srlm").setLevel(logging.ERROR)
        transformers.utils.logging.disable_progress_bar()
