"""Bad and hostile input battery (issue 12): every case exits with the promised code and a message that
names the problem, prints no traceback, and leaves every file already saved byte-identical.

CLI cases run in-process (``pamarl.cli.main``) against one tiny trained run (MAPPO on the penalty
matrix game, 2 x 10 steps per iteration): the battery takes seconds, not a subprocess start per case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pamarl.cli import main

TINY = ["num_envs=2", "rollout_len=10", "hidden=[8]", "eval_episodes=1", "tensorboard=false", "progress=false",
        "checkpoint_every=1"]
ENV = "matrix/penalty"
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (the lock file's text is only a message)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".pamarl.lock"}


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    """A folder with a finished tiny run ``run`` (20 iterations of... no: 2 iterations) and an IPPO run ``other``."""
    root = tmp_path_factory.mktemp("bad")
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "40", "--run-dir", str(root / "run"), *TINY]) == 0
    assert main(["train", "--algo", "ippo", "--env", ENV, "--steps", "20", "--run-dir", str(root / "other"),
                 *TINY]) == 0
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "20", "--run-dir", str(root / "wide"),
                 *TINY, "hidden=[16]"]) == 0
    return root


def expect(argv: list[str], code: int, needles: tuple[str, ...], capsys, guard: Path) -> str:
    """Run ``pamarl argv``; check the code, the message, no traceback and that ``guard`` is unchanged."""
    before = snapshot(guard)
    capsys.readouterr()
    got = main(argv)
    out, err = capsys.readouterr()
    assert got == code, (argv, got, err)
    assert "Traceback" not in err + out, err
    for n in needles:
        assert n.lower() in err.lower(), (argv, n, err)
    assert snapshot(guard) == before, f"{argv} changed saved files"
    return err


def sub(area: Path, text: str) -> list[str]:
    return [a.replace("{A}", str(area)) for a in text.split("\x00")] if "\x00" in text else \
        [a.replace("{A}", str(area)) for a in text.split()]


# ----------------------------------------------------------------------------- config values
VALUES = [
    ("--steps 0", "'steps'"), ("--steps -5", "'steps'"), ("gamma=1.5", "'gamma'"), ("gamma=0", "'gamma'"),
    ("gamma=nan", "'gamma'"), ("gae_lambda=2", "'gae_lambda'"), ("gae_lambda=-0.1", "'gae_lambda'"),
    ("hidden=[0]", "'hidden'"), ("hidden=[64,-3]", "'hidden'"), ("hidden=[]", "'hidden'"), ("lr=-1", "'lr'"),
    ("lr=0", "'lr'"), ("lr=nan", "'lr'"), ("lr=inf", "'lr'"), ("lr=abc", "'lr'"), ("critic_lr=-1", "'critic_lr'"),
    ("--seed -1", "'seed'"), ("seed=abc", "'seed'"), ("rollout_len=0", "'rollout_len'"), ("num_envs=0", "'num_envs'"),
    ("num_envs=abc", "integer"), ("num_envs=2.5", "integer"), ("env_workers=-1", "'env_workers'"),
    ("eval_every=-1", "'eval_every'"), ("eval_episodes=0", "'eval_episodes'"),
    ("checkpoint_every=-1", "'checkpoint_every'"), ("checkpoint_minutes=-1", "'checkpoint_minutes'"),
    ("torch_threads=0", "'torch_threads'"), ("activation=sigmoid", "'activation'"), ("clip=1.5", "'clip'"),
    ("clip=0", "'clip'"), ("entropy_coef=-0.1", "'entropy_coef'"), ("epochs=0", "'epochs'"),
    ("minibatches=0", "'minibatches'"), ("minibatches=1000", "minibatches=1000"),
    ("max_grad_norm=-1", "'max_grad_norm'"), ("adam_eps=0", "'adam_eps'"), ("tensorboard=maybe", "true/false"),
    ("progress=2", "true/false"), ("eval_deterministic=perhaps", "true/false"), ("cost_limit=-1", "'cost_limit'"),
    ("share_params=maybe", "true/false"), ("critic_input=foo", "'critic_input'"), ("value_clip=-1", "'value_clip'"),
    ("lrr=0.1", "'lr'"), ("algo.steps=5", "put it under run:"), ("run.clip=0.3", "put it under algo:"),
    ("notkeyvalue", "key=value"), ("=5", "key=value"), ("huber_delta=-2", "'huber_delta'"),
    ("--algo mapo", "mappo"), ("--algo progressive alpha_init=1.5", "'alpha_init'"),
    ("--algo progressive lambda_lr=-1", "'lambda_lr'"), ("--algo qmix tau=0", "'tau'"),
    ("--algo qmix tau=2", "'tau'"), ("--algo qmix batch_size=0", "'batch_size'"),
    ("--algo qmix buffer_size=0", "'buffer_size'"), ("--algo qmix n_step=0", "'n_step'"),
    ("--algo qmix eps_start=1.5", "'eps_start'"), ("--algo qmix hypernet_layers=3", "'hypernet_layers'"),
    ("--algo qmix batch_size=64 buffer_size=32", "buffer_size=32"), ("--algo hatd3 policy_delay=0", "'policy_delay'"),
    ("--algo maddpg gumbel_tau=0", "'gumbel_tau'"), ("--algo hatrpo kl_threshold=0", "'kl_threshold'"),
    ("--algo hatrpo backtrack_coeff=1", "'backtrack_coeff'"), ("--algo iql eps_finish=-0.5", "'eps_finish'"),
]


@pytest.mark.parametrize("args,needle", VALUES, ids=[v[0] for v in VALUES])
def test_bad_config_value(args, needle, area, tmp_path, capsys):
    argv = ["train", "--env", ENV, "--run-dir", str(tmp_path / "new"), *TINY, *args.split()]
    if "--algo" not in args:
        argv[1:1] = ["--algo", "mappo"]
    if "--steps" not in args:
        argv[1:1] = ["--steps", "20"]
    expect(argv, 2, (needle,), capsys, area)
    assert not (tmp_path / "new").exists()  # nothing is made for a run that cannot start


# ----------------------------------------------------------------------------- env ids
ENV_IDS = [
    ("mpe/simple_spread_v3?N=0", "'N'"), ("mpe/simple_spread_v3?N=abc", "'N'"),
    ("mpe/simple_spread_v3?continuous=maybe", "'continuous'"), ("mpe/simple_spread_v3?max_cycles=-3", "'max_cycles'"),
    ("mpe/simple_spread_v3?local_ratio=2", "'local_ratio'"), ("mpe/simple_tag_v3?prey=bear", "'prey'"),
    ("mpe/simple_spread_v3?bogus=1", "bogus"), ("mpe/simple_spread_v3?N=nan", "'N'"),
    ("matrix/penalty?k=abc", "'k'"), ("matrix/penalty?k=nan", "'k'"), ("matrix/homogeneity_trap?n=3", "even"),
    ("matrix/homogeneity_trap?n=0", "'n'"), ("matrix/climbing?steps=0", "'steps'"),
    ("matrix/climbing?scale=-1", "'scale'"), ("matrix/climbing?n=4", "homogeneity_trap"),
    ("mpe/simple_sprea_v3", "simple_spread_v3"), ("nofamily", "no family"), ("foo/bar", "unknown env family"),
    ("pettingzoo/no_such_module_xyz:fn", "cannot import"), ("pettingzoo/os:no_such_fn", "no callable"),
    ("pettingzoo/json:loads", "bad parameter"), ("pettingzoo/builtins:len", "builtins"),
]


@pytest.mark.parametrize("env_id,needle", ENV_IDS, ids=[e[0] for e in ENV_IDS])
def test_bad_env_id(env_id, needle, area, tmp_path, capsys):
    expect(["train", "--algo", "mappo", "--env", env_id, "--steps", "20", "--run-dir", str(tmp_path / "new"), *TINY],
           2, (needle,), capsys, area)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- config files
def _cfg(tmp_path: Path, text: str | bytes) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


CONFIG_FILES = [
    ("missing", None, "does not exist"), ("directory", "DIR", "is a directory"),
    ("bad yaml", "a: [1, 2", "not valid YAML"),
    ("a list", "- 1\n- 2\n", "mapping"), ("binary", b"\xff\xfe\x00garbage", "not valid YAML"),
    ("run key under algo", "algo:\n  steps: 5\n", "put it under run:"),
    ("algo key under run", "run:\n  lr: 0.1\n", "put it under algo:"), ("unknown key", "lrr: 0.1\n", "'lr'"),
    ("bad value", "gamma: 2\n", "'gamma'"), ("bad bool", "tensorboard: maybe\n", "true/false"),
    ("section not a mapping", "run: 5\n", "unknown config key 'run'"), ("bad env", "env: matrix/nope\n", "'nope'"),
]


@pytest.mark.parametrize("name,text,needle", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file(name, text, needle, area, tmp_path, capsys):
    path = str(tmp_path / "missing.yaml") if text is None else str(tmp_path) if text == "DIR" else _cfg(tmp_path, text)
    expect(["train", "--config", path, "--run-dir", str(tmp_path / "new")], 2, (needle,), capsys, area)


@pytest.mark.skipif(ROOT, reason="root reads files whatever their permissions")
def test_unreadable_config_file(area, tmp_path, capsys):
    p = _cfg(tmp_path, "lr: 0.1\n")
    os.chmod(p, 0)
    expect(["train", "--config", p], 2, ("cannot be read",), capsys, area)


# ----------------------------------------------------------------------------- run directories
RUN_DIRS = [
    ("new run over a run", "train --algo mappo --env matrix/penalty --run-dir {A}/run", ("--resume", "--overwrite")),
    ("overwrite keeps foreign files", "train --algo mappo --env matrix/penalty --run-dir {A}/foreign --overwrite",
     ("did not write",)),
    ("new run over foreign files", "train --algo mappo --env matrix/penalty --run-dir {A}/foreign", ("--overwrite",)),
    ("run dir is a file", "train --algo mappo --env matrix/penalty --run-dir {A}/afile", ("is a file",)),
    ("run dir below a file", "train --algo mappo --env matrix/penalty --run-dir {A}/afile/sub", ("cannot create",)),
    ("name too long", "train --algo mappo --env matrix/penalty --run-dir {A}/" + "x" * 300, ("cannot create",)),
    ("resume missing dir", "train --resume {A}/nope", ("not a pamarl run directory",)),
    ("resume dir without config", "train --resume {A}/foreign", ("not a pamarl run directory",)),
    ("resume with --config", "train --resume {A}/run --config x.yaml", ("--config starts a new run",)),
    ("resume with --overwrite", "train --resume {A}/run --overwrite", ("--overwrite starts a new run",)),
    ("resume with other --run-dir", "train --resume {A}/run --run-dir {A}/other", ("leave out --run-dir",)),
    ("checkpoint without resume", "train --checkpoint {A}/run/checkpoints/latest.pt", ("use it with --resume",)),
    ("resume below steps done", "train --resume {A}/run --steps 20", ("already did 40",)),
    ("resume same steps", "train --resume {A}/run", ("larger --steps",)),
    ("resume changes hidden", "train --resume {A}/run --steps 80 hidden=[16]", ("'hidden'", "networks")),
    ("resume changes env", "train --resume {A}/run --steps 80 --env matrix/climbing", ("'env'",)),
    ("resume changes algo", "train --resume {A}/run --steps 80 --algo ippo", ("'algo'",)),
    ("resume changes seed", "train --resume {A}/run --steps 80 --seed 7", ("'seed'",)),
    ("resume changes num_envs", "train --resume {A}/run --steps 80 num_envs=4", ("'num_envs'",)),
    ("resume changes rollout_len", "train --resume {A}/run --steps 80 rollout_len=5", ("'rollout_len'",)),
    ("resume changes share_params", "train --resume {A}/run --steps 80 share_params=true", ("'share_params'",)),
    ("resume changes gamma", "train --resume {A}/run --steps 80 gamma=0.5", ("'gamma'",)),
    ("resume bad value", "train --resume {A}/run --steps 80 lr=-1", ("'lr'",)),
    ("resume unknown key", "train --resume {A}/run --steps 80 lrr=1", ("'lr'",)),
    ("resume foreign checkpoint", "train --resume {A}/run --steps 80 --checkpoint {A}/other/checkpoints/latest.pt",
     ("'ippo'",)),
    ("resume checkpoint of other size", "train --resume {A}/run --steps 80 --checkpoint {A}/wide/checkpoints/latest.pt",
     ("does not match",)),
    ("resume garbage checkpoint", "train --resume {A}/run --steps 80 --checkpoint {A}/garbage.pt", ("corrupt",)),
    ("resume missing checkpoint", "train --resume {A}/run --steps 80 --checkpoint {A}/nope.pt", ("no checkpoint",)),
]


@pytest.fixture(scope="module")
def dirs(area):
    (area / "foreign").mkdir(exist_ok=True)
    (area / "foreign" / "notes.txt").write_text("mine")
    (area / "afile").write_text("not a directory")
    (area / "garbage.pt").write_bytes(b"garbage")
    return area


@pytest.mark.parametrize("name,cmd,needles", RUN_DIRS, ids=[r[0] for r in RUN_DIRS])
def test_bad_run_dir(name, cmd, needles, dirs, capsys):
    expect(sub(dirs, cmd), 2, needles, capsys, dirs)


def test_locked_run_dir(area, capsys):
    from pamarl.rundir import RunLock

    with RunLock(area / "run"):  # another writer (flock is per open file, so this process counts as one)
        expect(["train", "--resume", str(area / "run"), "--steps", "80"], 2, ("in use by process", str(os.getpid())),
               capsys, area)
        expect(["train", "--algo", "mappo", "--env", ENV, "--run-dir", str(area / "run"), "--overwrite"], 2,
               ("in use",), capsys, area)


def test_stale_lock_of_dead_process_is_ignored(tmp_path, capsys):
    """A lock file left by a killed process does not block: the kernel dropped its flock."""
    import subprocess

    d = tmp_path / "run"
    src = str(Path(__file__).parents[1] / "src")
    code = (f"import sys, os; sys.path.insert(0, {src!r}); from pamarl.rundir import RunLock; "
            f"RunLock({str(d)!r}).acquire(); os.kill(os.getpid(), 9)")
    d.mkdir()
    subprocess.run([sys.executable, "-c", code], check=False)
    assert "pid" in (d / ".pamarl.lock").read_text()
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "20", "--run-dir", str(d), *TINY]) == 0


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc (a file system no one can write)")
def test_run_dir_on_unwritable_file_system(area, capsys):
    expect(["train", "--algo", "mappo", "--env", ENV, "--run-dir", "/proc/pamarl_h12/run"], 2, ("cannot create",),
           capsys, area)


@pytest.mark.skipif(ROOT, reason="root writes into read-only directories")
def test_read_only_run_dir(tmp_path, capsys, area):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    expect(["train", "--algo", "mappo", "--env", ENV, "--run-dir", str(ro / "run")], 2, ("cannot create",),
           capsys, area)


def test_overwrite_starts_over(tmp_path, capsys):
    d = tmp_path / "run"
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "40", "--run-dir", str(d), *TINY]) == 0
    (d / "notes.txt").write_text("mine")
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "20", "--run-dir", str(d), *TINY,
                 "--overwrite"]) == 0
    assert (d / "notes.txt").read_text() == "mine"  # only the run's own outputs are deleted
    assert len((d / "metrics.csv").read_text().splitlines()) == 2  # header + the one iteration of the new run


# ----------------------------------------------------------------------------- eval and checkpoints
def _corrupt(area: Path, name: str, how: str) -> Path:
    d = area / f"ev_{name}"
    if not d.exists():
        shutil.copytree(area / "run", d)
        p = d / "checkpoints" / "latest.pt"
        if how == "missing":
            p.unlink()
        elif how == "truncated":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif how == "empty":
            p.write_bytes(b"")
        elif how == "pickle":  # a classic malicious pickle: would run os.system on load
            import pickle

            class Evil:
                def __reduce__(self):
                    return (os.system, ("echo pwned > " + str(d / "PWNED"),))

            p.write_bytes(pickle.dumps(Evil()))
        elif how == "noformat":
            torch.save({"algo": {}}, p)
        elif how == "cfg-garbage":
            (d / "config.yaml").write_text("run: [unclosed\n")
        elif how == "cfg-nosection":
            (d / "config.yaml").write_text("algo: {}\n")
        elif how == "cfg-badvalue":
            doc = yaml.safe_load((d / "config.yaml").read_text())
            doc["algo"]["gamma"] = 5
            (d / "config.yaml").write_text(yaml.safe_dump(doc))
        elif how == "cfg-unknown-algo":
            doc = yaml.safe_load((d / "config.yaml").read_text())
            doc["run"]["algo"] = "nosuchalgo"
            (d / "config.yaml").write_text(yaml.safe_dump(doc))
        elif how == "cfg-binary":
            (d / "config.yaml").write_bytes(b"\xff\xfe\x00\x01")
    return d


EVALS = [
    ("missing checkpoint", "missing", [], "no checkpoint"), ("truncated checkpoint", "truncated", [], "corrupt"),
    ("empty checkpoint", "empty", [], "corrupt"), ("malicious pickle", "pickle", [], "corrupt"),
    ("not a pamarl checkpoint", "noformat", [], "not a pamarl-checkpoint"),
    ("garbage config", "cfg-garbage", [], "corrupt"), ("config without run", "cfg-nosection", [], "corrupt"),
    ("config bad value", "cfg-badvalue", [], "'gamma'"), ("config unknown algo", "cfg-unknown-algo", [], "nosuchalgo"),
    ("binary config", "cfg-binary", [], "corrupt"),
    ("episodes 0", None, ["--episodes", "0"], "--episodes"), ("episodes -1", None, ["--episodes", "-1"], "--episodes"),
    ("foreign checkpoint", None, ["--checkpoint", "{A}/other/checkpoints/latest.pt"], "'ippo'"),
    ("checkpoint of other size", None, ["--checkpoint", "{A}/wide/checkpoints/latest.pt"], "does not match"),
    ("checkpoint missing", None, ["--checkpoint", "{A}/nope.pt"], "no checkpoint"),
    ("checkpoint is a dir", None, ["--checkpoint", "{A}/run"], "no checkpoint"),
    ("other --env", None, ["--env", "matrix/climbing"], "only re-states"),
    ("not a run dir", "NOTRUN", [], "not a pamarl run directory"),
]


@pytest.mark.parametrize("name,how,extra,needle", EVALS, ids=[e[0] for e in EVALS])
def test_bad_eval(name, how, extra, needle, area, capsys):
    if how == "NOTRUN":
        d = area / "nope"
    else:
        d = _corrupt(area, name.replace(" ", "_"), how) if how else area / "run"
    expect(["eval", str(d), *[a.replace("{A}", str(area)) for a in extra]], 2, (needle,), capsys, area)
    assert not (d / "PWNED").exists()
    if how and how.startswith("cfg") and how != "cfg-unknown-algo":  # resume reads the same file
        expect(["train", "--resume", str(d), "--steps", "80"], 2, ("config.yaml",), capsys, area)


# ----------------------------------------------------------------------------- hostile run directories
HOSTILE_MODULE = '''
from pathlib import Path
def boom(**kw):
    Path(__file__).with_name("RAN").write_text("code from a run directory ran")
    raise RuntimeError("hostile factory ran")
'''


@pytest.fixture
def hostile(area, tmp_path, monkeypatch):
    """A copy of the run whose config.yaml names an env that imports a module and calls it."""
    (tmp_path / "hostile_mod_h12.py").write_text(HOSTILE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    d = tmp_path / "cmp" / "runs" / "mappo" / "matrix_penalty" / "seed1"  # where compare looks for it
    shutil.copytree(area / "run", d)
    doc = yaml.safe_load((d / "config.yaml").read_text())
    doc["run"]["env"] = "pettingzoo/hostile_mod_h12:boom"
    (d / "config.yaml").write_text(yaml.safe_dump(doc))
    from pamarl.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(d / "checkpoints" / "latest.pt")  # consistent with the edited config
    save_checkpoint(d / "checkpoints" / "latest.pt", {**state, "env": doc["run"]["env"]})
    return d, tmp_path / "RAN"


def test_hostile_config_eval(hostile, capsys):
    d, ran = hostile
    expect(["eval", str(d)], 2, ("imports and runs python code", "--trust-env-code", "--env"), capsys, d)
    assert not ran.exists()


def test_hostile_config_resume(hostile, capsys):
    d, ran = hostile
    expect(["train", "--resume", str(d), "--steps", "80"], 2, ("imports and runs python code", "--trust-env-code"),
           capsys, d)
    assert not ran.exists()


def test_hostile_config_report_and_plot(hostile, tmp_path, capsys):
    d, ran = hostile
    cmp = d.parents[3]
    main(["compare", "--algos", "mappo", "--envs", ENV, "--seeds", "1", "--steps", "40", "--out", str(cmp),
          "--report-only", *TINY])
    main(["plot", str(cmp), "--out", str(tmp_path / "c.png")])
    main(["plot", str(d), "--out", str(tmp_path / "d.png")])
    assert "Traceback" not in capsys.readouterr().err
    assert not ran.exists()


def test_trust_flag_is_what_lets_code_run(hostile, capsys):
    """The refusal above is the trust check, not an accident: with --trust-env-code the factory runs."""
    d, ran = hostile
    expect(["eval", str(d), "--trust-env-code"], 2, ("could not be built",), capsys, d)
    assert ran.exists()


# ----------------------------------------------------------------------------- compare and plot
COMPARE = [
    ("unknown algo", "--algos mapo --envs matrix/penalty", "mappo"),
    ("bad env", "--algos mappo --envs matrix/nope", "'nope'"),
    ("bad env param", "--algos mappo --envs matrix/penalty?k=abc", "'k'"),
    ("seeds 0", "--algos mappo --envs matrix/penalty --seeds 0", "--seeds"),
    ("seeds abc", "--algos mappo --envs matrix/penalty --seeds abc", "--seeds"),
    ("seeds twice", "--algos mappo --envs matrix/penalty --seeds 1,1", "twice"),
    ("steps 0", "--algos mappo --envs matrix/penalty --steps 0", "--steps"),
    ("workers 0", "--algos mappo --envs matrix/penalty --workers 0", "--workers"),
    ("evals 0", "--algos mappo --envs matrix/penalty --evals -1", "--evals"),
    ("no algos", "--envs matrix/penalty", "--algos"), ("no envs", "--algos mappo", "--envs"),
    ("scoped to other algo", "--algos mappo --envs matrix/penalty qmix:lr=0.1", "not in --algos"),
    ("bad override", "--algos mappo --envs matrix/penalty gamma=7", "'gamma'"),
    ("unknown override", "--algos mappo --envs matrix/penalty lrr=1", "'lr'"),
]


def test_compare_with_corrupt_run_config(area, tmp_path, capsys):
    d = tmp_path / "cmp" / "runs" / "mappo" / "matrix_penalty" / "seed1"
    shutil.copytree(area / "run", d)
    (d / "config.yaml").write_text("run: [unclosed\n")
    expect(["compare", "--algos", "mappo", "--envs", ENV, "--seeds", "1", "--steps", "40", "--out",
            str(tmp_path / "cmp"), "--report-only", *TINY], 2, ("corrupt",), capsys, tmp_path)


@pytest.mark.parametrize("name,cmd,needle", COMPARE, ids=[c[0] for c in COMPARE])
def test_bad_compare(name, cmd, needle, area, tmp_path, capsys):
    expect(["compare", "--out", str(tmp_path / "cmp"), *cmd.split()], 2, (needle,), capsys, area)


PLOTS = [
    ("missing path", ["{A}/nope"], "does not exist"), ("no runs", ["{A}/foreign"], "holds none"),
    ("bad format", ["{A}/run", "--out", "{T}/x.xyz"], "xyz"),
    ("no extension", ["{A}/run", "--out", "{T}/x"], "extension"),
    ("smooth 0", ["{A}/run", "--smooth", "0"], "--smooth"),
    ("unknown metric", ["{A}/run", "--metric", "nope"], "logged"),
    ("corrupt run config", ["{A}/ev_garbage_config"], "valid run config"),
]


@pytest.mark.parametrize("name,args,needle", PLOTS, ids=[p[0] for p in PLOTS])
def test_bad_plot(name, args, needle, dirs, tmp_path, capsys):
    _corrupt(dirs, "garbage_config", "cfg-garbage")
    argv = ["plot", *[a.replace("{A}", str(dirs)).replace("{T}", str(tmp_path)) for a in args]]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "c.png")]
    expect(argv, 2, (needle,), capsys, dirs)
    assert not (tmp_path / "c.png").exists()


# ----------------------------------------------------------------------------- signals and recovery messages
def _signal_at(monkeypatch, n: int, signals: list[int]) -> None:
    """Deliver ``signals`` to this process during the ``n``-th algorithm update (mid-iteration)."""
    from pamarl.algos.registry import get_algorithm

    cls = get_algorithm("mappo")
    real = cls.update
    calls = {"n": 0}

    def update(self, progress):
        calls["n"] += 1
        if calls["n"] == n:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(self, progress)

    monkeypatch.setattr(cls, "update", update)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_checkpoint_and_says_where(sig, code, tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    _signal_at(monkeypatch, 2, [sig])
    argv = ["train", "--algo", "mappo", "--env", ENV, "--steps", "200", "--run-dir", str(d), *TINY,
            "checkpoint_every=0", "checkpoint_minutes=0"]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert f"checkpoint written to {d / 'checkpoints' / 'latest.pt'}" in err and "Traceback" not in err
    state = torch.load(d / "checkpoints" / "latest.pt", weights_only=True)
    assert state["iteration"] == 2 and state["exact"] is False
    monkeypatch.undo()
    assert main(["train", "--resume", str(d), "--steps", "200"]) == 0
    assert "bit-identically" in capsys.readouterr().out


def test_second_ctrl_c_before_any_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    _signal_at(monkeypatch, 1, [signal.SIGINT, signal.SIGINT])
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "200", "--run-dir", str(d), *TINY,
                 "checkpoint_every=0"]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was written yet" in err and "intact" not in err and "Traceback" not in err
    assert not (d / "checkpoints" / "latest.pt").exists()


def test_second_ctrl_c_names_the_checkpoint_on_disk(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    _signal_at(monkeypatch, 3, [signal.SIGINT, signal.SIGINT])
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "200", "--run-dir", str(d), *TINY]) == 130
    err = capsys.readouterr().err
    assert "iteration 2, 40 env steps" in err and "Traceback" not in err


def test_interrupt_outside_training_claims_nothing(capsys, monkeypatch):
    import pamarl.cli as cli

    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_list", stop)
    assert main(["list"]) == 130
    err = capsys.readouterr().err
    assert "intact" not in err and "no checkpoint" in err


def _crash_at(monkeypatch, n: int) -> None:
    """A hard stop (KeyboardInterrupt, as from a second Ctrl-C) inside the ``n``-th update."""
    from pamarl.algos.registry import get_algorithm

    cls = get_algorithm("mappo")
    real = cls.update
    calls = {"n": 0}

    def update(self, progress):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, progress)

    monkeypatch.setattr(cls, "update", update)


def test_wall_time_checkpoints(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    _crash_at(monkeypatch, 3)
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "100", "--run-dir", str(d), *TINY,
                 "checkpoint_every=0", "checkpoint_minutes=0.000001", "keep_checkpoints=true"]) == 130
    state = torch.load(d / "checkpoints" / "latest.pt", weights_only=True)
    assert state["iteration"] == 2 and state["exact"] is False
    assert not list((d / "checkpoints").glob("it*.pt"))  # numbered copies are of periodic checkpoints only
    assert "iteration 2, 40 env steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume with changes
def test_resume_changes_recorded_and_plain_resume_exact(tmp_path, capsys, monkeypatch):
    a, b, c = (tmp_path / n for n in "abc")
    base = ["--algo", "mappo", "--env", ENV, "--steps", "80", *TINY, "checkpoint_every=2", "checkpoint_minutes=0"]

    def rows(d):  # metrics.csv without the wall-time column
        return [ln.split(",", 3)[:2] + ln.split(",", 3)[3:] for ln in (d / "metrics.csv").read_text().splitlines()]

    assert main(["train", "--run-dir", str(a), *base]) == 0
    for d in (b, c):
        _crash_at(monkeypatch, 3)
        assert main(["train", "--run-dir", str(d), *base]) == 130
        monkeypatch.undo()
    assert main(["train", "--resume", str(b)]) == 0
    assert rows(b) == rows(a) and len(rows(a)) == 5  # bit-exact, and nothing recorded as changed
    assert not (b / "config_history.yaml").exists()
    assert main(["train", "--resume", str(c), "lr=1e-4", "entropy_coef=0.02", "eval_every=1"]) == 0
    hist = yaml.safe_load((c / "config_history.yaml").read_text())
    assert hist[-1]["changes"]["lr"] == {"from": 0.0005, "to": 0.0001} and hist[-1]["iteration"] == 2
    assert set(hist[-1]["changes"]) == {"lr", "entropy_coef", "eval_every"}
    assert yaml.safe_load((c / "config.yaml").read_text())["algo"]["lr"] == 0.0001
    assert rows(c)[:3] == rows(a)[:3] and rows(c)[3:] != rows(a)[3:]
    from pamarl.checkpoint import load_checkpoint

    groups = load_checkpoint(c / "checkpoints" / "latest.pt")["algo"]["actor_opts"][0]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(1e-4)  # the new rate reached the optimiser loaded from the checkpoint


# ----------------------------------------------------------------------------- disk full, simulator errors
def test_disk_full_during_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    import pamarl.checkpoint as ck

    d = tmp_path / "run"
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "20", "--run-dir", str(d), *TINY]) == 0
    before = snapshot(d)
    real = torch.save

    def full(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    assert main(["train", "--resume", str(d), "--steps", "40"]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "previous checkpoint there is intact" in err and "Traceback" not in err
    after = snapshot(d)
    assert after["checkpoints/latest.pt"] == before["checkpoints/latest.pt"]
    assert not (d / "checkpoints" / "latest.pt.tmp").exists()


def test_simulator_error_names_env_and_step(tmp_path, capsys, monkeypatch):
    from pamarl.envs.matrix import MatrixGame

    calls = {"n": 0}
    real = MatrixGame.step

    def broken(self, actions):
        calls["n"] += 1
        if calls["n"] == 15:
            raise FloatingPointError("simulator blew up")
        return real(self, actions)

    monkeypatch.setattr(MatrixGame, "step", broken)
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "60", "--run-dir", str(tmp_path / "r"),
                 *TINY]) == 1
    err = capsys.readouterr().err
    assert "'matrix/penalty' failed at step 15" in err and "simulator blew up" in err and "Traceback" not in err
    calls["n"] = 0
    assert main(["--debug", "train", "--algo", "mappo", "--env", ENV, "--steps", "60", "--run-dir",
                 str(tmp_path / "r2"), *TINY]) == 1
    assert "Traceback" in capsys.readouterr().err  # --debug shows it


def test_every_config_field_has_a_rule():
    """New config fields must declare their range (pamarl.validation.RULES or field metadata)."""
    from pamarl.algos.registry import algorithms
    from pamarl.config import TrainConfig
    from pamarl.nets.mlp import ACTIVATIONS
    from pamarl.validation import RULES, rule_for

    missing = [f"{cls.__name__}.{f.name}" for cls in [TrainConfig, *(a.Config for a in algorithms().values())]
               for f in dataclasses.fields(cls) if rule_for(cls, f.name) is None]
    assert not missing, f"add these to pamarl.validation.RULES: {missing}"
    assert set(RULES["activation"].choices or ()) == set(ACTIVATIONS)


def test_nan_message_is_true_and_its_advice_works(tmp_path, capsys, monkeypatch):
    """The NaN message's advice (resume with a lower learning rate) is accepted and recorded."""
    from pamarl.algos.common import check_finite
    from pamarl.algos.registry import get_algorithm

    cls = get_algorithm("mappo")
    real, calls = cls.update, {"n": 0}

    def update(self, progress):
        calls["n"] += 1
        if calls["n"] == 3:
            check_finite(torch.tensor(float("nan")), "the policy loss")
        return real(self, progress)

    monkeypatch.setattr(cls, "update", update)
    d = tmp_path / "run"
    assert main(["train", "--algo", "mappo", "--env", ENV, "--steps", "80", "--run-dir", str(d), *TINY]) == 1
    err = capsys.readouterr().err
    assert "NaN" in err and "--resume" in err and "iteration 2, 40 env steps" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(d), "lr=1e-4", "max_grad_norm=1"]) == 0
    assert set(yaml.safe_load((d / "config_history.yaml").read_text())[-1]["changes"]) == {"lr", "max_grad_norm"}
