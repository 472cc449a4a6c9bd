"""Configs: defaults, YAML + dotted overrides, and clear errors for bad input before any actor starts."""

import subprocess
import sys

import pytest

from aapo_ray.cli import main
from aapo_ray.config import ConfigError, load_config, parse_override
from aapo_ray.preflight import load_checked_config


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg.algo.estimator == "aapo" and cfg.algo.margin_clip == (0.2, 0.28)
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  group_size: 4\nlearner:\n  zero_stage: 2\n")
    cfg = load_config(path, ["algo.margin_clip=null", "rollout.temperature=0.7", "reward.functions={format: 1, cosine: 2}"])
    assert (cfg.algo.group_size, cfg.learner.zero_stage, cfg.algo.margin_clip) == (4, 2, None)
    assert cfg.rollout.temperature == 0.7 and cfg.reward.functions == {"format": 1.0, "cosine": 2.0}
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize("overrides, message", [
    (["algo.grup_size=3"], "algo.grup_size: unknown key; did you mean 'group_size'?"),
    (["lerner.lr=1"], "lerner: unknown key; did you mean 'learner'?"),
    (["algo.group_size=six"], "algo.group_size: Input should be a valid integer"),
    (["learner.zero_stage=5"], "learner.zero_stage"),
    (["algo.group_size=1"], "group_size=1 with algo.scale_rewards=true"),
    (["rollout.prompts_per_step=3", "algo.group_size=3", "learner.num_learners=2"], "do not split evenly"),
    (["rollout.backend=sglang"], "needs rollout.gpus_per_replica > 0"),
    (["algo.kl_beta=0.1"], "AAPO has no KL term"),
    (["algo.kl_beta=0.1", "algo.estimator=gpg"], "nor have aapo_no_margin and gpg"),
    (["algo.kl_beta=0.1", "algo.estimator=aapo_no_margin"], "nor have aapo_no_margin and gpg"),
    (["algo.los_agg=token_mean"], "algo.los_agg: unknown key; did you mean 'loss_agg'?"),
    (["algo.loss_agg=seq_mean"], "algo.loss_agg"),
    (["algo.estimator=ppo"], "algo.estimator"),
    (["algo.gpg_valid_threshold=0.6"], "algo.estimator=aapo would ignore it"),
    (["algo.gpg_valid_threshold=1.5", "algo.estimator=gpg"], "algo.gpg_valid_threshold"),
    (["learner.bf16=true"], "needs GPUs"),
    (["reward.functions={nope: 1}"], "reward.functions.nope"),
    (["reward.functions={'no_such_pkg.mod:fn': 1}"], "no_such_pkg"),
    (["rollout.temperature=-1"], "rollout.temperature"),
    (["algo.margin_clip=[-0.1, 0.2]"], "magnitudes"),
    (["algo"], "not KEY=VALUE"),
])
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_checked_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


@pytest.mark.parametrize("command", [["train"], ["check-config"], ["reference", "build"]])
def test_cli_rejects_invalid_config_before_starting_or_importing_anything(command):
    code = ("import sys; from aapo_ray.cli import main; status = main(sys.argv[1:]); "
            "print(status, *sorted({'torch', 'transformers', 'ray', 'aapo_ray.driver'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, *command, "algo.grup_size=3", "learner.num_learners=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2"]  # exit status 2, and none of the heavy modules imported: no cluster either
    assert "did you mean 'group_size'" in proc.stderr and "learner.num_learners" in proc.stderr


def test_train_resume_of_a_directory_without_a_config_fails_at_once(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml there; is it a run directory?" in capsys.readouterr().err


def test_check_config_prints_the_resolved_config(capsys):
    assert main(["check-config", "algo.estimator=grpo"]) == 0
    assert "estimator: grpo" in capsys.readouterr().out


@pytest.mark.parametrize("estimator, scale, agg, beta", [
    ("aapo", True, "token_mean", 0.0), ("aapo_no_margin", True, "token_mean", 0.0), ("gpg", False, "token_mean", 0.0),
    ("grpo", True, "seq_mean_token_mean", 0.04), ("dr_grpo", False, "seq_mean_token_sum_norm", 0.0)])
def test_estimator_defaults_resolve_and_explicit_values_win(tmp_path, estimator, scale, agg, beta):
    from aapo_ray.config import dump_config

    cfg = load_config(None, [f"algo.estimator={estimator}"])
    assert (cfg.algo.scale_rewards, cfg.algo.loss_agg, cfg.algo.kl_beta) == (None, None, None)  # "not set"
    assert [cfg.algo.resolve(k) for k in ("scale_rewards", "loss_agg", "kl_beta")] == [scale, agg, beta]
    # the run directory's config.yaml holds the values that ran, and reloads to them
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    again = load_config(tmp_path / "c.yaml")
    assert (again.algo.scale_rewards, again.algo.loss_agg, again.algo.kl_beta) == (scale, agg, beta)
    mine = load_config(None, [f"algo.estimator={estimator}", "algo.loss_agg=group_token_mean", "algo.scale_rewards=false"])
    assert mine.algo.resolve("loss_agg") == "group_token_mean" and mine.algo.resolve("scale_rewards") is False
    assert load_config(None, ["algo.estimator=grpo", "algo.kl_beta=0"]).algo.resolve("kl_beta") == 0.0


def test_compute_matched_grpo_arm():
    """GRPO with 2G samples per prompt generates what AAPO generates with G policy + G reference samples."""
    from aapo_ray.config import STUDY_ARMS

    aapo, grpo = load_config(), load_config(None, STUDY_ARMS["grpo_compute_matched"])
    assert grpo.algo.estimator == "grpo" and grpo.completions_per_step == 2 * aapo.completions_per_step
    assert load_config(None, STUDY_ARMS["grpo_compute_matched"] + ["learner.num_learners=2"])
