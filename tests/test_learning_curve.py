"""The loop measures every model it makes (base, SFT baseline, M1, M2, ...) and the report draws the curve."""

import json

import lightning as L
import pytest

from srlm.data.datamodule import SFTDataModule, load_sft_file
from srlm.evaluation.report import learning_curve, write_report
from srlm.models.backbone import BackboneConfig
from srlm.models.sft import SFTModule
from srlm.selfreward.config import DPORoundConfig, EvalConfig, SelfRewardConfig
from srlm.inference.engine import Sampling
from srlm.trainer import SRLMTrainer

IFEVAL_KEYS = ("prompt_level_strict", "inst_level_strict", "prompt_level_loose", "inst_level_loose")


def run_loop(tiny_model, run_dir, **loop_args):
    L.seed_everything(0)
    trainer = SRLMTrainer(accelerator="cpu", max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(run_dir), limit_val_batches=0, logger=True)
    model = SFTModule(BackboneConfig(model_name_or_path=tiny_model))
    data = SFTDataModule(max_length=256, max_prompt_length=192, batch_size=2, val_fraction=0.0)
    self_reward = SelfRewardConfig(num_prompts=3, few_shot=3, num_candidates=3, judge_mode="logit",
                                   prompt_sampling=Sampling(1.0, 1.0, 16), candidate_sampling=Sampling(1.0, 1.0, 12),
                                   batch_size=4, allow_unfinished_chosen=True)  # the tiny model rarely ends a turn
    evaluation = EvalConfig(max_prompts=3, h2h_prompts=2, max_new_tokens=8, ifeval_max_prompts=4,
                            ifeval_max_new_tokens=12)
    return trainer.loop(model, data, run_dir=str(run_dir), iterations=1, self_reward=self_reward,
                        dpo=DPORoundConfig(max_steps=2, max_length=256, max_prompt_length=128), checkpoint_every=1,
                        evaluation=evaluation, **loop_args)


@pytest.mark.slow
def test_loop_evaluates_base_sft_baseline_and_every_model(tiny_model, tmp_path):
    run = tmp_path / "run"
    manifest = run_loop(tiny_model, run, sft_baseline=True)
    phases = manifest["phases"]
    for name in ("base", "sft", "m1", "iter_1"):
        reward = phases[f"eval/{name}"]["counts"]
        assert reward["n_prompts"] == 3
        ifeval = phases[f"ifeval/{name}"]["counts"]
        assert ifeval["n_prompts"] == 4 and all(0.0 <= ifeval[k] <= 1.0 for k in IFEVAL_KEYS)
        assert (run / name / "ifeval" / "ifeval_responses.jsonl").exists()
        saved = json.loads((run / name / "metrics.json").read_text())
        assert saved["evaluation"]["ifeval"]["n_prompts"] == 4 and "pairwise_accuracy" in saved["evaluation"]["eval"]
    # The SFT baseline is trained on the IFT data alone (the paper's comparison point), M1 on IFT + EFT.
    n_ift = len(load_sft_file("seed:ift.jsonl"))
    assert phases["sft"]["counts"]["train_examples"] == n_ift < phases["m1"]["counts"]["train_examples"]
    assert json.loads((run / "sft" / "model" / "srlm_lineage.json").read_text())
    # M2 is compared with M1 (its reference) and with the SFT baseline, as in the paper's table.
    assert phases["h2h/iter_1"]["counts"]["against"] == "M1"
    assert phases["h2h/iter_1/vs_SFT"]["counts"]["against"] == "SFT"

    report = (run / "report.md").read_text()
    assert "## Learning curve" in report and "learning_curve.png" in report
    table = report.split("## Learning curve")[1].split("##")[0]
    for label in ("M0 (base)", "SFT", "M1", "M2"):
        assert f"| {label} |" in table
    assert (run / "plots" / "learning_curve.png").stat().st_size > 0
    curve = json.loads((run / "learning_curve.json").read_text())
    assert [row["label"] for row in curve] == ["M0 (base)", "SFT", "M1", "M2"]
    assert curve[0]["ifeval"]["prompt_level_strict"] == phases["ifeval/base"]["counts"]["prompt_level_strict"]

    # A rerun of the finished run measures nothing again.
    stamp = (run / "base" / "ifeval" / "ifeval.json").stat().st_mtime_ns
    run_loop(tiny_model, run, sft_baseline=True)
    assert (run / "base" / "ifeval" / "ifeval.json").stat().st_mtime_ns == stamp


def test_learning_curve_orders_models_and_tolerates_missing_parts(tmp_path):
    phases = {
        "eval/iter_2": {"done": True, "counts": {"pairwise_accuracy": 0.6}},
        "ifeval/m1": {"done": True, "counts": {"prompt_level_strict": 0.2, "n_prompts": 10}},
        "eval/base": {"done": True, "counts": {"pairwise_accuracy": 0.5}},
        "ifeval/sft": {"done": True, "counts": {"prompt_level_strict": 0.1}},
        "h2h/iter_1/vs_SFT": {"done": True, "counts": {"wins": 1}},
    }
    rows = learning_curve(phases)
    assert [r["label"] for r in rows] == ["M0 (base)", "SFT", "M1", "M3"]
    assert rows[1]["reward"] == {} and rows[3]["ifeval"] == {}
    (tmp_path / "manifest.json").write_text(json.dumps({"phases": phases}))
    report = write_report(str(tmp_path)).read_text()
    assert "| M3 |" in report and "20.0%" in report


def test_same_data_keeps_every_setting_and_ignores_cli_bookkeeping():
    from srlm.selfreward.loop import same_data

    data = SFTDataModule(ift_files=["seed:ift.jsonl"], eft_files=["seed:eft_train.jsonl"], max_length=300,
                         max_prompt_length=200, batch_size=3, val_fraction=0.0)
    data.hparams["_class_path"] = "srlm.data.datamodule.SFTDataModule"  # as LightningCLI leaves it
    copy = same_data(data, eft_files=[])
    assert (copy.max_length, copy.max_prompt_length, copy.batch_size, copy.val_fraction) == (300, 200, 3, 0.0)
    assert copy.ift_files == ["seed:ift.jsonl"] and copy.eft_files == []


@pytest.mark.slow
def test_loop_selects_checkpoints_and_records_the_choice(tiny_model, tmp_path):
    from srlm.selfreward.select import SelectionConfig

    selection = SelectionConfig(metric="judge", every_n_steps=1, max_prompts=3, phases=["m1", "dpo"])
    manifest = run_loop(tiny_model, tmp_path / "run", selection=selection)
    for phase in ("m1", "iter_1/train"):
        chosen = manifest["phases"][phase]["counts"]["selection"]
        assert chosen["metric"] == "judge" and chosen["best_step"] in (1, 2) and chosen["final_step"] == 2
    assert "selection" not in manifest["phases"].get("sft", {}).get("counts", {})
