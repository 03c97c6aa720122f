"""``benchmarks/parity_mpe.py``: what it parses from pamarl and HARL runs, the table, the commands, and
one real (tiny) pamarl run through it. HARL itself is not needed: its log is written by the test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pamarl.metrics import mean_ci

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "parity_mpe.py"
_spec = importlib.util.spec_from_file_location("parity_mpe", _PATH)
assert _spec is not None and _spec.loader is not None
pm = importlib.util.module_from_spec(_spec)
sys.modules["parity_mpe"] = pm  # dataclasses resolve the module's annotations through sys.modules
_spec.loader.exec_module(pm)


def _harl_log(run_dir: Path, returns: list[float], total: int) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for i, r in enumerate(returns, 1):
        lines += [f"Env pettingzoo_mpe Task t-discrete Algo happo Exp parity updates {i}/{total} episodes, "
                  f"total num timesteps {i * 1600}/{total * 1600}, FPS 1400.",
                  "Average step reward is -1.0.", f"Some episodes done, average episode reward is {r}.", ""]
    (run_dir / "stdout.log").write_text("\n".join(lines))
    run = pm.Run("harl", "harl", "happo", "mpe/simple_reference_v3", int(run_dir.name[1:]), run_dir=run_dir,
                 cmd=["harl"])
    info = {k: getattr(run, k) for k in ("impl", "name", "algo", "env", "seed", "variant", "extra", "cmd")}
    (run_dir / "run.json").write_text(json.dumps(info))


def test_harl_log_is_parsed_only_when_finished_and_logged_every_update(tmp_path):
    _harl_log(tmp_path / "a" / "s1", [-50.0, -40.0, -30.5, -20.25, -10.0, -5.5], total=6)
    assert pm.last_harl(tmp_path / "a" / "s1") == ([-50.0, -40.0, -30.5, -20.25, -10.0, -5.5], 9600)
    _harl_log(tmp_path / "b" / "s1", [-50.0, -40.0], total=6)  # still running
    assert pm.last_harl(tmp_path / "b" / "s1") is None
    log = tmp_path / "b" / "s1" / "stdout.log"
    log.write_text(log.read_text().replace("updates 2/6", "updates 6/6"))  # finished, but updates unlogged
    with pytest.raises(SystemExit, match="log_interval 1"):
        pm.last_harl(tmp_path / "b" / "s1")


def test_table_is_the_mean_of_the_last_five_iterations_with_a_t_interval(tmp_path):
    per_seed = {1: [-9.0, -60.0, -50.0, -40.0, -30.0, -20.0], 2: [-9.0, -30.0, -30.0, -30.0, -30.0, -30.0],
                3: [-9.0, -20.0, -21.0, -22.0, -23.0, -24.0]}
    for seed, rets in per_seed.items():
        _harl_log(tmp_path / "harl-happo" / "mpe_simple_reference_v3" / f"s{seed}", rets, total=6)
    finals = [sum(r[-5:]) / 5 for r in per_seed.values()]
    m, lo, hi = mean_ci(finals)
    text = pm.table(pm.found(tmp_path))
    row = next(ln for ln in text.splitlines() if ln.startswith("| mpe/simple_reference_v3"))
    assert row == (f"| mpe/simple_reference_v3 | harl happo | 9,600 | {m:.1f} [{lo:.1f}, {hi:.1f}] | "
                   "s1 -40.0, s2 -30.0, s3 -22.0 |")


def test_a_variant_puts_its_options_before_and_its_keys_after_the_fixed_settings():
    run = pm.Run("pamarl", "pamarl", "happo", "mpe/simple_spread_v3", 2, "harl", ["--preset", "harl", "critic=shared"],
                 Path("d"))
    cmd = pm.pamarl_cmd("py", run, 300_000)
    assert cmd[:4] == ["py", "-m", "pamarl.cli", "train"]
    i = cmd.index("--preset")
    assert cmd[i + 1] == "harl" and i < cmd.index("num_envs=8") < cmd.index("critic=shared")
    assert "--seed" in cmd and cmd[cmd.index("--seed") + 1] == "2" and "rollout_len=200" in cmd
    assert pm.harl_steps(300_000) == 300_800  # the same 188 updates as pamarl


def test_a_real_pamarl_run_through_the_script_is_measured(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--out", str(out), "--steps", "8000", "--seeds", "1", "--algos", "mappo",
            "--envs", "mpe/simple_spread_v3", "--name", "pamarl-now"]
    assert pm.main(argv) == 0
    run_dir = out / "pamarl-now-mappo" / "mpe_simple_spread_v3" / "s1"
    rets, steps = pm.last_pamarl(run_dir)
    assert steps == 8000 and len(rets) == 5
    text = capsys.readouterr().out
    assert f"| mpe/simple_spread_v3 | pamarl-now mappo | 8,000 | {sum(rets) / 5:.1f} [n/a, n/a] | s1" in text
    assert pm.main(argv) == 0  # finished runs are reused, not trained again
    assert "1 runs, 0 to train" in capsys.readouterr().out
