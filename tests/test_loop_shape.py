"""The shape of the loop's code: no import circle, keyword-only ``run_loop``, one default per knob, one config
per method, lazy weights, one seed derivation and one end-of-phase callback (fast: no model runs)."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from srlm.data.datamodule import PreferenceDataModule
from srlm.data.pair_config import PairDataConfig
from srlm.inference import judge as judge_module
from srlm.inference.judge import JUDGE_SAMPLES, JUDGE_SAMPLING
from srlm.models.dpo import DPOConfig, DPOModule
from srlm.prompts import JUDGE_TEMPLATE
from srlm.seeds import derive_seed
from srlm.selfreward import commands, steps
from srlm.selfreward.config import CANDIDATE_SAMPLING, PROMPT_SAMPLING, DPORoundConfig, EvalConfig, SelfRewardConfig

REPO = Path(__file__).resolve().parents[1]


def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_the_loop_imports_without_the_trainer():
    code = ("import sys, srlm.selfreward.loop; assert 'srlm.trainer' not in sys.modules, 'import circle'; "
            "import srlm.trainer")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


def test_run_loop_takes_keywords_in_the_order_of_trainer_loop():
    from srlm.selfreward.loop import run_loop
    from srlm.trainer import SRLMTrainer

    params = list(inspect.signature(run_loop).parameters.values())
    assert params[0].name == "trainer"
    assert all(p.kind is p.KEYWORD_ONLY for p in params[1:])
    assert [p.name for p in params[1:]] == list(inspect.signature(SRLMTrainer.loop).parameters)[1:]
    with pytest.raises(TypeError):
        run_loop(None, None)


def test_one_default_per_judge_knob():
    sr, ev = SelfRewardConfig(), EvalConfig()
    assert sr.judge_sampling == JUDGE_SAMPLING and sr.judge_samples == ev.judge_samples == JUDGE_SAMPLES
    assert sr.judge_template == JUDGE_TEMPLATE
    judge = defaults(commands.judge)
    assert (judge["temperature"], judge["top_p"], judge["max_new_tokens"]) == dataclasses.astuple(JUDGE_SAMPLING)
    assert judge["samples"] == JUDGE_SAMPLES and judge["template"] == JUDGE_TEMPLATE
    for cls in (judge_module.GenerativeJudge, judge_module.ReasonedJudge):
        assert defaults(cls.__init__)["sampling"] is JUDGE_SAMPLING
    from srlm.evaluation.reward import evaluate_reward, evaluate_reward_with

    assert defaults(evaluate_reward)["max_new_tokens"] == JUDGE_SAMPLING.max_new_tokens
    assert defaults(evaluate_reward)["judge_template"] == defaults(evaluate_reward_with)["template"] == JUDGE_TEMPLATE


def test_one_default_per_sampling_knob():
    sr = SelfRewardConfig()
    assert sr.prompt_sampling == PROMPT_SAMPLING and sr.candidate_sampling == CANDIDATE_SAMPLING
    assert sr.prompt_sampling is not PROMPT_SAMPLING  # each config its own copy: editing one edits no default
    assert defaults(steps.generate_prompts)["sampling"] is PROMPT_SAMPLING
    assert defaults(steps.generate_candidates)["sampling"] is CANDIDATE_SAMPLING
    for fn, sampling in ((commands.generate_prompts, PROMPT_SAMPLING), (commands.generate_candidates, CANDIDATE_SAMPLING)):
        d = defaults(fn)
        assert (d["temperature"], d["top_p"], d["max_new_tokens"]) == dataclasses.astuple(sampling)
        assert d["batch_size"] == sr.batch_size and d["seed"] == sr.seed
    assert defaults(commands.generate_prompts)["num_prompts"] == sr.num_prompts
    assert defaults(commands.generate_candidates)["n"] == sr.num_candidates


def test_dpo_settings_are_one_config_the_module_and_the_round_share():
    d, module = DPOConfig(), defaults(DPOModule.__init__)
    assert {f.name: module[f.name] for f in dataclasses.fields(DPOConfig)} == dataclasses.asdict(d) | {
        "optimizer": d.optimizer}
    data = defaults(PreferenceDataModule.__init__)
    assert {f.name: data[f.name] for f in dataclasses.fields(PairDataConfig)} == dataclasses.asdict(PairDataConfig())
    round_ = DPORoundConfig()
    assert isinstance(round_, DPOConfig) and isinstance(round_, PairDataConfig)
    with pytest.raises(ValueError, match="loss_type"):
        DPORoundConfig(loss_type="nope")
    dm = DPORoundConfig(batch_size=3, max_length=64, max_prompt_length=32).datamodule(["a.jsonl"])
    assert (dm.pair_files, dm.batch_size, dm.max_length, dm.max_prompt_length) == (["a.jsonl"], 3, 64, 32)


def test_a_module_made_for_the_loop_loads_its_weights_only_when_used(tmp_path):
    from srlm.models.backbone import BackboneConfig
    from srlm.models.base import deferred_loading
    from srlm.models.sft import SFTModule

    backbone = BackboneConfig(model_name_or_path=str(tmp_path / "absent"))
    with pytest.raises(Exception):
        SFTModule(backbone)  # elsewhere a module loads at construction
    with deferred_loading():  # as the loop command makes its M1 module
        module = SFTModule(backbone)  # settings only
    assert module.backbone_config.model_name_or_path.endswith("absent") and "model" not in module._modules
    with pytest.raises(Exception):
        module.model  # noqa: B018  (the first use loads, and there is nothing to load)
    with pytest.raises(AttributeError):
        module.no_such_attribute  # noqa: B018


def test_derive_seed_is_stable_and_separates_streams():
    assert derive_seed(0, "iteration", 1) == derive_seed(0, "iteration", 1)
    seeds = {derive_seed(s, name, t) for s in range(3) for name in ("iteration", "prompts", "round") for t in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2 ** 32 for s in seeds)
    assert derive_seed(1, 1000) != derive_seed(1001, 0)  # no arithmetic collisions between streams


def test_the_end_of_phase_callback_marks_done_before_creating(tmp_path):
    from srlm.selfreward.creator import SelfRewardCallback
    from srlm.selfreward.rundir import RunDir

    run = RunDir(tmp_path / "run")
    seen = {}

    class Creator:  # stands in for InstructionCreator: records what the run said when creation began
        device, show_progress = None, None

        def ensure(self, model_dir):
            seen["done"], seen["model"] = run.done("m1"), model_dir
            return {}

    trainer = SimpleNamespace(global_step=3, default_root_dir=str(tmp_path), is_global_zero=True)
    module = SimpleNamespace(device="cpu", exported_to=tmp_path / "m1", export_path=lambda: None)
    SelfRewardCallback(run, "m1", lambda tr: {"train_examples": 5}, Creator()).on_fit_end(trainer, module)
    assert seen == {"done": True, "model": tmp_path / "m1"}
    assert run.info("m1")["counts"] == {"train_examples": 5, "steps": 3}


def test_the_end_of_phase_callback_drops_the_trained_weights_before_creating(tmp_path, tiny_model):
    """Creation loads M_t from its export: the fit's own copy of the network is dropped first (one model in memory),
    and a later use of the module loads it again."""
    from srlm.models.backbone import BackboneConfig
    from srlm.models.sft import SFTModule
    from srlm.selfreward.creator import SelfRewardCallback
    from srlm.selfreward.rundir import RunDir

    module = SFTModule(BackboneConfig(model_name_or_path=tiny_model, lora=True))
    seen = {}

    class Creator:
        device, show_progress = None, None

        def ensure(self, model_dir):
            seen["loaded while creating"] = "model" in module._modules
            return {}

    trainer = SimpleNamespace(global_step=1, default_root_dir=str(tmp_path), is_global_zero=True)
    module.exported_to = tmp_path / "m1"
    SelfRewardCallback(RunDir(tmp_path / "run"), "m1", lambda tr: {}, Creator()).on_fit_end(trainer, module)
    assert seen == {"loaded while creating": False}
    assert sum(p.numel() for p in module.model.parameters()) > 0  # used again: loaded again


def test_the_round_config_parses_its_inherited_nested_settings():
    """jsonargparse resolves the annotations a DPORoundConfig inherits (the optimizer is an OptimConfig, merged
    with its defaults, not a bare dict)."""
    from jsonargparse import ArgumentParser

    from srlm.models.optim import OptimConfig

    parser = ArgumentParser()
    parser.add_argument("--dpo", type=DPORoundConfig, default=DPORoundConfig())
    config = parser.instantiate_classes(parser.parse_string("dpo:\n  optimizer: {lr: 1.0e-3}\n  max_length: 64\n"))
    assert config.dpo.optimizer == OptimConfig(lr=1e-3, warmup_ratio=0.1, schedule="linear", min_lr_ratio=0.1)
    assert config.dpo.max_length == 64 and config.dpo.beta == DPOConfig.beta


def test_the_loop_command_never_loads_a_model_it_does_not_train(tmp_path):
    """With M1 given and nothing to run, `loop` needs no model at all: the one named may as well be absent."""
    import json

    from srlm.cli import main

    main(["loop", "--config", str(REPO / "configs" / "smoke.yaml"), "--model.init_args.backbone.model_name_or_path",
          str(tmp_path / "absent"), "--m1_adapter", str(tmp_path / "m1"), "--iterations", "0",
          "--evaluation.enabled", "false", "--run_dir", str(tmp_path / "run"),
          "--trainer.default_root_dir", str(tmp_path)])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["final_model"] == str(tmp_path / "m1") and manifest["base_model"].endswith("absent")


def test_the_loops_evaluation_is_served_by_the_self_reward_backend(tmp_path):
    """One serving choice for the whole loop: the evaluation's engine and head-to-head's take ``self_reward``'s
    backend, so a backend no engine has stops each before any model is loaded (the model may be absent)."""
    from srlm.selfreward.loop import Phases
    from srlm.selfreward.rundir import RunDir

    self_reward = SelfRewardConfig()
    self_reward.backend = "bogus"  # past the config's own check: what reaches the evaluation
    run = RunDir(tmp_path / "run")
    phases = Phases(trainer=None, run=run, model=None, datamodule=None, iterations=1, m1_adapter=None,
                    self_reward=self_reward, dpo=None, ev=EvalConfig(h2h_prompts=1), checkpoint_every=1, selection=None)
    absent = str(tmp_path / "absent")
    with pytest.raises(ValueError, match="backend 'bogus'"):
        phases.evaluate("m1", absent)  # reward metrics and IFEval
    run.mark_done("eval/m1", {})
    run.mark_done("ifeval/m1", {})
    with pytest.raises(ValueError, match="backend 'bogus'"):
        phases.evaluate("m1", absent, [("M0", absent)])  # head-to-head
    assert not run.done("h2h/m1")
