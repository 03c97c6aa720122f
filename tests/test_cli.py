"""The command line: error paths exit with 2 and name the nearest valid names; train/eval/list work."""

from __future__ import annotations

import json

import pytest

from pamarl.cli import main


@pytest.mark.parametrize("args,needle", [
    (["train", "--algo", "mapo"], "mappo"),
    (["train", "--env", "mpe/simple_sprea_v3"], "simple_spread_v3"),
    (["train", "lrr=0.1"], "'lr'"),
    (["train", "num_envs=abc"], "integer"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["eval", "/nonexistent_run"], "not a pamarl run directory"),
])
def test_cli_errors(args, needle, capsys):
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_cli_train_eval_resume_list(tmp_path, capsys):
    rd = tmp_path / "run"
    common = ["progress=false", "tensorboard=false", "num_envs=2", "rollout_len=50", "eval_episodes=2"]
    assert main(["train", "--algo", "mappo", "--steps", "200", "--run-dir", str(rd), *common]) == 0
    out = capsys.readouterr().out
    assert "run directory" in out and (rd / "config.yaml").exists() and (rd / "summary.json").exists()
    assert main(["train", "--algo", "mappo", "--steps", "200", "--run-dir", str(rd)]) == 2  # would overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(rd), "--steps", "400"]) == 0
    assert json.loads((rd / "summary.json").read_text())["env_steps"] == 400
    capsys.readouterr()
    assert main(["eval", str(rd), "--episodes", "3", "--json"]) == 0
    assert "eval/return_mean" in json.loads(capsys.readouterr().out)
    (rd / "checkpoints" / "latest.pt").write_bytes(b"garbage")
    assert main(["eval", str(rd)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "progressive" in out and "mpe/simple_spread_v3" in out and "matrix/homogeneity_trap" in out
    assert main(["list", "--config", "progressive"]) == 0
    assert "alpha_init" in capsys.readouterr().out
