"""Several processes on CPU (gloo): DDP training equals one process, shared generation writes each record once.

Each multi-process case runs a script in a subprocess: Lightning's DDP launcher relaunches the
running script for the other ranks, which must not be pytest itself.
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

TRAIN = textwrap.dedent('''
    """SFT then DPO (two Trainers in one process, as in the loop) for 3 steps on fixed-order data."""
    import json, sys
    import lightning as L, torch
    from torch.utils.data import DataLoader, DistributedSampler
    from srlm.data.datamodule import PreferenceDataModule, SFTDataModule
    from srlm.models.backbone import BackboneConfig
    from srlm.models.dpo import DPOModule
    from srlm.models.optim import OptimConfig
    from srlm.models.sft import SFTModule

    tiny, devices, per_device, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    class InOrder:  # no shuffling: 1 process x 2b and 2 processes x b (rank r: items r, r+2, ...) see the same
        def _loader(self, dataset, train):  # global batches (Lightning's own DDP sampler always shuffles)
            sampler = DistributedSampler(dataset, shuffle=False) if self.trainer.world_size > 1 else None
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False, collate_fn=self.collate)

    class SFTData(InOrder, SFTDataModule): pass
    class PairData(InOrder, PreferenceDataModule): pass

    class Losses(L.Callback):
        def __init__(self):
            self.values = []
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.values.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    def fit(module, data):
        losses = Losses()
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=3,
                            logger=False, default_root_dir=out + ".root", enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[losses],
                            use_distributed_sampler=False)
        trainer.fit(module, datamodule=data)
        weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        return losses.values, weights, trainer

    backbone = BackboneConfig(model_name_or_path=tiny, lora_dropout=0.0)
    optim = OptimConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant")
    L.seed_everything(0)
    # export_dir None: the adapter goes to the trainer's log_dir, which every rank must ask for
    sft_losses, sft_weights, trainer = fit(SFTModule(backbone, optim, export_dir=None),
                                           SFTData(ift_files=["seed:ift.jsonl"], eft_files=[], max_length=96,
                                                   max_prompt_length=64, batch_size=per_device, val_fraction=0.0))
    L.seed_everything(0)
    dpo_losses, dpo_weights, trainer = fit(DPOModule(backbone, optim, export_dir=out + ".dpo"),
                                           PairData(pair_files=["seed:prefs.jsonl"], max_length=96,
                                                    max_prompt_length=48, batch_size=per_device))
    if trainer.is_global_zero:
        torch.save({"sft": sft_losses, "dpo": dpo_losses, "sft_weights": sft_weights, "dpo_weights": dpo_weights,
                    "world_size": trainer.world_size}, out)
''')

STEPS = textwrap.dedent('''
    """Prompts, candidates and judgements on `world` ranks (gloo), then a resume of a cut candidates file."""
    import json, os, sys
    import torch
    import torch.distributed as td
    import torch.multiprocessing as mp

    def work(rank, world, tiny, out, port):
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            td.init_process_group("gloo", rank=rank, world_size=world)
        from pathlib import Path
        from srlm.models.backbone import load_for_inference, load_tokenizer
        from srlm.prompts import load_template
        from srlm.selfreward import distributed as dist, steps
        from srlm.inference.engine import Engine, Sampling
        from srlm.inference.judge import make_judge

        out = Path(out)
        tok = load_tokenizer(tiny)
        engine = Engine(load_for_inference(tiny), {tok.eos_token_id}, tok.pad_token_id, batch_size=2, seed=5)
        seeds = [f"Explain topic number {i} in two sentences." for i in range(12)]
        steps.generate_prompts(engine, tok, seeds, load_template("self_instruct", "examples"), out / "prompts.jsonl",
                               target=5, max_requests=12, few_shot=3, sampling=Sampling(1.0, 1.0, 12), seed=1,
                               requests_per_batch=2, show_progress=False)
        prompts = [{"id": f"q{i}", "prompt": f"Question {i}: what is {i} plus {i}?"} for i in range(9)]  # 5 batches
        before = engine.stats["generated_tokens"]
        steps.generate_candidates(engine, tok, prompts, out / "candidates.jsonl", n=2, sampling=Sampling(1.0, 1.0, 8),
                                  show_progress=False)
        ran = engine.stats["generated_tokens"] - before  # candidates only: prompt rounds may run past the target
        judge = make_judge("logit", engine, tok, load_template("judge_additive", "question", "response"))
        candidates = steps.existing(out / "candidates.jsonl")
        steps.judge_candidates(judge, candidates, out / "judgements.jsonl", part=5, show_progress=False)
        # A cut file (as after a kill) resumes to the same records, on the same ranks.
        if dist.is_rank0():
            lines = (out / "candidates.jsonl").read_text().splitlines(keepends=True)
            (out / "resumed.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # and a torn line
        dist.barrier()
        steps.generate_candidates(engine, tok, prompts, out / "resumed.jsonl", n=2, sampling=Sampling(1.0, 1.0, 8),
                                  show_progress=False)
        (out / f"rank{rank}.json").write_text(json.dumps({"generated_tokens": ran, "world": dist.world_size()}))
        if world > 1:
            td.destroy_process_group()

    if __name__ == "__main__":
        tiny, world, out, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        if world == 1:
            work(0, 1, tiny, out, port)
        else:
            mp.spawn(work, args=(world, tiny, out, port), nprocs=world)
''')


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(tmp_path, name, text, *args, timeout=300):
    script = tmp_path / name
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def records(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_two_process_ddp_training_equals_one_process_with_the_same_global_batch(tiny_model, tmp_path):
    run_script(tmp_path, "train.py", TRAIN, tiny_model, 1, 4, tmp_path / "one.pt")
    run_script(tmp_path, "train.py", TRAIN, tiny_model, 2, 2, tmp_path / "two.pt", timeout=180)  # a hang fails
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for phase in ("sft", "dpo"):
        assert len(one[phase]) == len(two[phase]) == 3
        # The first loss equals whatever the update; later ones only when the DDP gradient is the global one.
        assert two[phase] == pytest.approx(one[phase], rel=1e-4, abs=1e-5), phase
        assert one[phase][2] != pytest.approx(one[phase][0], rel=1e-3)  # training moved the loss
        w1, w2 = one[f"{phase}_weights"], two[f"{phase}_weights"]
        assert w1.keys() == w2.keys() and w1
        for name in w1:
            # Adam turns tiny gradient round-off into a few 1e-5 differences; a wrong gradient moves 1e-2.
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=5e-4, msg=f"{phase} {name}")
    for exported in ("two.pt.root/adapter", "two.pt.dpo"):  # rank 0 exported, the other rank did not hang it
        assert (tmp_path / exported / "adapter_config.json").exists()


@pytest.mark.slow
def test_two_process_generation_writes_each_record_once_and_as_one_process(tiny_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(tmp_path, "steps.py", STEPS, tiny_model, 1, one, 0)
    run_script(tmp_path, "steps.py", STEPS, tiny_model, 2, two, free_port())
    for name, key, count in (("prompts.jsonl", "id", 5), ("prompts.log.jsonl", "request", None),
                             ("candidates.jsonl", "id", 18), ("judgements.jsonl", "id", 18), ("resumed.jsonl", "id", 18)):
        a, b = records(one / name), records(two / name)
        ids = [r[key] for r in b]
        assert len(ids) == len(set(ids)), f"{name}: duplicates"
        if count is not None:
            assert len(b) == count, name
        assert sorted(a, key=lambda r: r[key]) == sorted(b, key=lambda r: r[key]), name
    by_id = lambda rows: sorted(rows, key=lambda r: r["id"])  # noqa: E731
    assert by_id(records(two / "resumed.jsonl")) == by_id(records(two / "candidates.jsonl"))
    # Both ranks generated (the work was shared), and the split is the fixed batch k -> rank k % 2.
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["generated_tokens"] > 0 for r in ranks)
    total = json.loads((one / "rank0.json").read_text())["generated_tokens"]
    assert ranks[0]["generated_tokens"] + ranks[1]["generated_tokens"] == total


def smoke(tiny_model, run_dir, devices, strategy="ddp", log=None):
    args = [sys.executable, "main.py", "loop", "--config", "configs/smoke.yaml",
            f"--model.init_args.backbone.model_name_or_path={tiny_model}", "--trainer.accelerator=cpu",
            f"--trainer.devices={devices}", "--trainer.enable_progress_bar=false", f"--run_dir={run_dir}"]
    if strategy == "fsdp":
        args[5:5] = ["--config", "configs/strategies/fsdp.yaml"]
    elif devices > 1:
        args.append("--trainer.strategy=ddp")
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    if log is not None:
        log.append(proc.stderr)
    return json.loads((run_dir / "manifest.json").read_text())


def first_dpo_loss(run_dir) -> float:
    (metrics,) = (run_dir / "iter_1" / "dpo").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("loss")]
    return float(rows[0]["loss"])


@pytest.mark.slow
def test_smoke_loop_under_two_process_fsdp2_exports_what_ddp_trains(tiny_model, tmp_path):
    from safetensors.torch import load_file

    log = []
    fsdp = smoke(tiny_model, tmp_path / "fsdp", 2, strategy="fsdp", log=log)
    assert "sharded with FSDP2 over 2 processes" in log[0]  # the weights really were sharded
    assert fsdp["world_size"] == 2 and fsdp["phases"]["iter_1/train"]["done"]
    assert abs(first_dpo_loss(tmp_path / "fsdp") - math.log(2)) < 1e-4
    ddp = smoke(tiny_model, tmp_path / "ddp", 2)
    assert ddp["world_size"] == 2
    # M1, exported from the gathered shards, is the model DDP trains on the same data
    a = load_file(tmp_path / "fsdp" / "m1" / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "m1" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "fsdp" / "iter_1" / "model" / "adapter_config.json").exists()


@pytest.mark.slow
def test_smoke_loop_under_two_process_ddp_matches_one_process(tiny_model, tmp_path):
    one = smoke(tiny_model, tmp_path / "one", 1)
    two = smoke(tiny_model, tmp_path / "two", 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert sorted(one["phases"]) == sorted(two["phases"]) and two["phases"]["iter_1/train"]["done"]
    for name in ("prompts", "candidates", "judgements", "pairs"):
        a, b = records(tmp_path / "one" / "iter_1" / f"{name}.jsonl"), records(tmp_path / "two" / "iter_1" / f"{name}.jsonl")
        assert len(b) == len(a) > 0 and len({r["id"] for r in b}) == len(b), name
    # Prompts come from the base model: the same on any number of processes.
    assert records(tmp_path / "one" / "iter_1" / "prompts.jsonl") == records(tmp_path / "two" / "iter_1" / "prompts.jsonl")
    assert (tmp_path / "two" / "iter_1" / "model" / "adapter_config.json").exists()
    assert len(list((tmp_path / "two" / "m1" / "lightning_logs").iterdir())) == 1  # rank 0 alone logs
    assert (tmp_path / "two" / "report.md").exists()


def test_loop_refuses_sharded_and_spawning_strategies(tmp_path):
    import lightning as L

    from srlm.selfreward import distributed as dist

    class Fake:  # the strategy type is all check_loop_strategy reads
        def __init__(self, strategy):
            self.strategy = strategy

    FSDP = type("FSDPStrategy", (), {})  # FSDP1; FSDP2 (ModelParallelStrategy) is allowed
    DeepSpeed = type("DeepSpeedStrategy", (), {"config": {"zero_optimization": {"stage": 3}}})
    DeepSpeed2 = type("DeepSpeedStrategy", (), {"config": {"zero_optimization": {"stage": 2}}})
    for strategy in (FSDP(), DeepSpeed()):
        with pytest.raises(ValueError, match="shards the weights"):
            dist.check_loop_strategy(Fake(strategy))
    dist.check_loop_strategy(Fake(DeepSpeed2()))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="strategy=ddp"):
        dist.ensure_process_group(trainer)
    assert not dist.initialised()  # nothing was started


def test_one_process_helpers():
    from srlm.selfreward import distributed as dist

    assert (dist.rank(), dist.world_size(), dist.is_rank0()) == (0, 1, True)
    assert dist.all_gather({"a": 1}) == [{"a": 1}] and dist.broadcast(4) == 4
    seen = []
    gather = dist.RoundGather(seen.extend)
    gather.step([1, 2])
    gather.step([3])
    gather.finish()
    assert seen == [1, 2, 3]
    assert [dist.mine(k) for k in range(3)] == [True, True, True]
