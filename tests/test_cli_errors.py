"""Bad input through the real command lines (train, generate, convert, plan), in subprocesses.

Every case asserts the exit status (2: the command line cannot be run as given; 1: it ran into an
error), that no traceback and no signal ended the process, and the words of the one- or two-line
message. The cases on a trained workdir assert that nothing was lost: the older checkpoints are
still there, and the one used is the newest that reads back.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import COMPILATION_CACHE, stdlib_corpus

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")
HF_FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "yarn_mtp_fp32"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
ENV.pop("DSV3_DEBUG", None)

# A training run small enough to compile and take a few steps in seconds (the smoke variant with a
# 512-piece vocabulary and 4 x 64-token batches).
SMALL = ["--config.model.vocab_size=512", "--config.data.seq_len=64", "--config.data.batch_size=4",
         "--config.data.validation_fraction=0.2", "--config.train.eval_batches=1",
         "--config.train.checkpoint_every=2", "--config.train.warmup_steps=2"]


def run(module: str, *args: str, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", f"dsv3_jax.{module}", *args], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def assert_refused(out, status: int, pattern: str) -> None:
    """Exit `status`, `error: ...` matching `pattern` in at most two lines, no traceback."""
    where = f"exit {out.returncode}\nstdout: {out.stdout[-1500:]}\nstderr: {out.stderr[-3000:]}"
    assert out.returncode == status, where
    assert "Traceback" not in out.stderr and "Fatal Python error" not in out.stderr, where
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, where
    message = out.stderr[out.stderr.index(errors[0]):].strip().splitlines()
    assert len(message) <= 2, where
    assert re.search(pattern, "\n".join(message)), where


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 20 real Python files (this interpreter's json and email packages)."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 4-step run of the command line: checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    out = run("train", f"--config={TINY}:smoke", f"--workdir={workdir}", *SMALL,
              f"--config.data.corpus={corpus}", "--config.train.steps=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


def train_args(workdir, corpus, *extra):
    tokenizer = f"--config.data.tokenizer={pathlib.Path(workdir) / 'tokenizer.model'}"
    return (f"--config={TINY}:smoke", f"--workdir={workdir}", *SMALL,
            f"--config.data.corpus={corpus}", tokenizer, *extra)


def copy_run(trained, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


# ------------------------------------------------------------------------------ train: the command line

TRAIN_USAGE = [
    (["--config.train.stepz=3"], r"config\.train\.stepz is not a setting; did you mean config\.train\.steps\?"),
    (["--config.optimizer.lr=1"], r"config\.optimizer is not a setting"),
    (["--config.model.n_layerz=2"], r"did you mean config\.model\.n_layers\?"),
    (["--config.train.steps=abc"], r"--config\.train\.steps=abc.*invalid literal"),
    (["--config.train.steps"], r"Missing value for flag --config\.train\.steps"),
    (["--bogus_flag=1"], r"Unknown command line flag 'bogus_flag'"),
    (["extra_argument"], r"unexpected arguments \['extra_argument'\]"),
    (["--num_processes=2", "--process_id=0"], r"need --coordinator_address"),
    (["--coordinator_address=host0", "--num_processes=2", "--process_id=0"], r"'host0' is not host:port"),
    (["--coordinator_address=host0:99999", "--num_processes=2", "--process_id=0"], r"not host:port"),
    (["--coordinator_address=host0:1234", "--num_processes=2", "--process_id=2"], r"--process_id=2 must be in \[0"),
    (["--coordinator_address=host0:1234"], r"needs --num_processes and --process_id"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=1",
      "--distributed_timeout=0"], r"--distributed_timeout=0 must be >= 1"),
]


@pytest.mark.parametrize("args,pattern", TRAIN_USAGE, ids=[a[0][0] for a in TRAIN_USAGE])
def test_train_usage_errors(args, pattern, tmp_path):
    out = run("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}", *args)
    assert_refused(out, 2, pattern)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address,pattern", [
    ("no-such-host.invalid:1234", r"the host 'no-such-host\.invalid' does not resolve"),
    ("127.0.0.1:1", r"no coordinator answered at --coordinator_address=127\.0\.0\.1:1 within 2 s"),
])
def test_train_coordinator_not_there(address, pattern, tmp_path):
    """A process other than 0 whose coordinator cannot be reached ends with a message (XLA's
    coordination client would abort the process instead)."""
    out = run("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
              f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
              "--distributed_timeout=2")
    assert_refused(out, 1, pattern)


def test_train_config_file_errors(tmp_path):
    missing = tmp_path / "nope.py"
    assert_refused(run("train", f"--config={missing}", f"--workdir={tmp_path}"), 2,
                   rf"no such file '{re.escape(str(missing))}'")
    assert_refused(run("train", f"--config={TINY}:nope", f"--workdir={tmp_path}"), 2,
                   r"unknown variant 'nope'")
    assert_refused(run("train", f"--config={TINY}"), 2, r"--workdir")
    assert_refused(run("train", f"--config={tmp_path}", f"--workdir={tmp_path}"), 2,
                   r"is a directory; pass a run config file")
    for name, text, status, pattern in [
            ("syntax.py", "def get_config(:\n", 2, r"invalid syntax"),
            ("none.py", "x = 1\n", 2, r"get_config"),
            ("number.py", "def get_config():\n    return 5\n", 1, r"not an ml_collections\.ConfigDict"),
            ("raises.py", "def get_config():\n    raise ValueError('this config needs a GPU')\n", 2,
             r"this config needs a GPU")]:
        (tmp_path / name).write_text(text)
        assert_refused(run("train", f"--config={tmp_path / name}", f"--workdir={tmp_path / 'w'}"),
                       status, pattern)


def test_empty_workdir_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.train", f"--config={TINY}", "--workdir="],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert_refused(out, 2, r"--workdir is empty")
    assert os.listdir(tmp_path) == []  # nothing was written into the current directory


TRAIN_VALUES = [
    ("train.lr=-1", r"config\.train\.lr=-1\.0 is invalid: it must be a finite number > 0"),
    ("train.lr=nan", r"config\.train\.lr=nan is invalid"),
    ("train.lr=inf", r"config\.train\.lr=inf is invalid"),
    ("train.steps=0", r"config\.train\.steps=0 is invalid: it must be an int in \[1, 2147483647\]"),
    ("train.checkpoint_every=0", r"config\.train\.checkpoint_every=0 is invalid"),
    ("train.keep_checkpoints=-2", r"config\.train\.keep_checkpoints=-2 is invalid"),
    ("train.log_every=0", r"config\.train\.log_every=0 is invalid"),
    ("train.eval_every=0", r"config\.train\.eval_every=0 is invalid"),
    ("train.warmup_steps=-1", r"config\.train\.warmup_steps=-1 is invalid"),
    ("train.b2=1.0", r"config\.train\.b2=1\.0 is invalid: it must be a finite number >= 0 and < 1"),
    ("train.clip=0", r"config\.train\.clip=0\.0 is invalid"),
    ("train.schedule=linear", r"config\.train\.schedule='linear' is invalid: it must be one of"),
    ("train.seed=-1", r"config\.train\.seed=-1 is invalid"),
    ("train.steps=100000000000", r"config\.train\.steps=100000000000 is invalid"),
    ("train.mtp_lambda=-0.5", r"config\.train\.mtp_lambda=-0\.5 is invalid"),
    ("data.batch_size=0", r"data\.batch_size=0 must be an int >= 1 and <= 2147483647"),
    ("data.seq_len=1", r"data\.seq_len=1 must be an int >= 2 and <= 2147483647"),
    ("data.validation_fraction=1.5", r"data\.validation_fraction=1\.5 must be a number strictly between 0 and 1"),
    ("data.format=xml", r"data\.format='xml' is not a known format"),
    ("data.seq_len=100000", r"seq_len=100000 exceeds the model's max_seq_len"),
    ("mesh.data=0", r"config\.mesh\.data=0 .*positive device count or -1"),
    ("model.n_layers=0", r"n_layers=0 is invalid"),
    ("model.preset=huge", r"unknown model preset 'huge'"),
]


@pytest.mark.parametrize("override,pattern", TRAIN_VALUES, ids=[v[0] for v in TRAIN_VALUES])
def test_train_bad_values(override, pattern, tmp_path):
    out = run("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}", f"--config.{override}")
    assert_refused(out, 1, pattern)


def test_train_bad_paths(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_refused(run("train", f"--config={TINY}", f"--workdir={blocker / 'run'}"), 1,
                   r"is not writable")
    assert_refused(run("train", f"--config={TINY}", f"--workdir={tmp_path / 'r'}",
                       f"--config.data.corpus={tmp_path / 'missing' / '*.txt'}"), 1,
                   r"matches no file|no such")


# ------------------------------------------------------------------------------ train: nothing lost

def test_keep_checkpoints_zero_loses_nothing(trained, corpus, tmp_path):
    workdir = copy_run(trained, tmp_path)
    out = run("train", *train_args(workdir, corpus, "--config.train.steps=6",
                                   "--config.train.keep_checkpoints=0"))
    assert_refused(out, 1, r"keep_checkpoints=0 is invalid.*\[1, .*fewer would delete every checkpoint")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


@pytest.mark.parametrize("damage", ["garbage_meta", "empty_step_folder"])
def test_training_resumes_past_a_damaged_newest_checkpoint(damage, trained, corpus, tmp_path):
    workdir = copy_run(trained, tmp_path)
    ckpts = workdir / "checkpoints"
    if damage == "garbage_meta":
        (ckpts / "4" / "meta" / "metadata").write_text("{not json")
        expect_from = 2
    else:
        (ckpts / "6").mkdir()
        expect_from = 4
    out = run("train", *train_args(workdir, corpus, "--config.train.steps=6"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from the checkpoint at step {expect_from}" in out.stderr, out.stderr[-3000:]
    damaged = 4 if damage == "garbage_meta" else 6
    assert len(list(ckpts.glob(f"{damaged}.unreadable-*"))) == 1  # set aside, not deleted
    assert (ckpts / "6").is_dir() and (ckpts / "6" / "state").is_dir()


def test_an_error_after_the_first_step_is_one_message_and_status_1(trained, corpus, tmp_path):
    """A NaN loss stops the run after saving; the process ends with status 1 (no signal, no
    traceback), the last good state saved."""
    workdir = copy_run(trained, tmp_path)
    out = run("train", *train_args(workdir, corpus, "--config.train.steps=8",
                                   "--config.train.lr=1e30", "--config.train.clip=1e30"))
    assert_refused(out, 1, r"step \d+: loss .*kept and saved at step \d+.*Lower config\.train\.lr")
    bad_step = re.search(r"error: step (\d+):", out.stderr).group(1)
    assert 5 <= int(bad_step) <= 8
    assert {"4", bad_step} <= set(os.listdir(workdir / "checkpoints"))  # nothing older went


def test_a_full_disk_is_one_message_and_keeps_the_last_good_checkpoint(trained, corpus, tmp_path):
    """The workdir on a 40 MB filesystem: the first checkpoint save runs out of space. The run
    ends with status 1 and one message (no library traceback, no signal); the checkpoints saved
    before are intact, and the failed save left no step folder behind."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        workdir = mount / "run"
        shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("tb", "tokens"))
        shutil.rmtree(workdir / "checkpoints" / "4")
        filler = mount / "filler"
        free = shutil.disk_usage(mount).free
        filler.write_bytes(b"\0" * max(free - 6 * 2**20, 0))  # about 6 MB left: tokens, no checkpoint
        out = run("train", *train_args(workdir, corpus, "--config.train.steps=6",
                                       "--config.train.eval_batches=0"))
        assert_refused(out, 1, r"(?i)no space|resource_exhausted|space left|disk")
        assert "Fatal Python error" not in out.stderr and out.returncode == 1
        steps = sorted(p for p in os.listdir(workdir / "checkpoints") if p.isdigit())
        assert steps == ["2"], os.listdir(workdir / "checkpoints")
        assert (workdir / "checkpoints" / "2" / "state").is_dir()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_verbose_and_dsv3_debug_show_the_traceback(tmp_path):
    for extra, env in ((["--verbose"], None), ([], dict(ENV, DSV3_DEBUG="1"))):
        out = run("train", f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.lr=-1",
                  *extra, env=env)
        assert out.returncode != 0 and "Traceback" in out.stderr, out.stderr[-2000:]
        assert "config.train.lr=-1.0 is invalid" in out.stderr


# ------------------------------------------------------------------------------ plan

PLAN_CASES = [
    (["--devices=abc"], 2, r"--devices: 'abc' is not a positive integer"),
    (["--devices=0"], 2, r"--devices: '0' is not a positive integer"),
    (["--devices=8,-4"], 2, r"'-4' is not a positive integer"),
    (["--per_device_batch=-1"], 2, r"--per_device_batch=-1 must be >= 1"),
    (["--mesh=expert=abc"], 2, r"--mesh: 'expert=abc' is not axis=size"),
    (["--mesh=foo=2"], 2, r"--mesh: 'foo=2' is not axis=size"),
    (["--mesh=expert=0"], 2, r"--mesh: 'expert=0' is not axis=size"),
    (["--devices=8", "--mesh=expert=3"], 1, r"config\.mesh"),
    (["--config.train.stepz=1"], 2, r"config\.train\.stepz is not a setting"),
    (["--config.train.lr=-1"], 1, r"config\.train\.lr=-1\.0 is invalid"),
    (["--grad_accum_steps=-2"], 2, r"--grad_accum_steps=-2 must be >= 1"),
    (["--grad_accum_steps=x"], 2, r"grad_accum_steps"),
    (["--capacity_factor=0.5"], 2, r"--capacity_factor=0\.5 must be 0 \(dropless\), a number >= 1"),
    (["--capacity_factor=-3"], 2, r"--capacity_factor=-3 must be 0"),
    (["--attention=flash"], 2, r"attention"),
]


@pytest.mark.parametrize("args,status,pattern", PLAN_CASES, ids=[c[0][-1] for c in PLAN_CASES])
def test_plan_errors(args, status, pattern):
    assert_refused(run("plan", f"--config={TINY}", *args), status, pattern)


def test_plan_json_through_the_command_line():
    out = run("plan", f"--config={TINY}", "--devices=8", "--mesh=expert=4,fsdp=-1",
              "--capacity_factor=1.25", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    (p,) = json.loads(out.stdout)
    assert p["devices"] == 8 and p["mesh"] == dict(data=1, fsdp=2, expert=4, tensor=1)
    assert p["global_batch"] == 8 and p["per_device_batch"] == 1 and p["grad_accum_steps"] == 1
    assert p["capacity_factor"] == 1.25
    parts = ("params", "optimizer", "gradients", "activations", "ep_buffers", "loss", "transient")
    assert set(p["bytes"]) == set(parts) | {"total"}
    assert p["bytes"]["total"] == sum(p["bytes"][k] for k in parts)


def test_plan_config_errors(tmp_path):
    assert_refused(run("plan", f"--config={tmp_path / 'x.py'}"), 2, r"no such file")
    assert_refused(run("plan"), 2, r"--config")


# ------------------------------------------------------------------------------ generate

GENERATE_USAGE = [
    (["--prompt=x"], r"--checkpoint"),
    (["--checkpoint=somewhere"], r"--prompt"),
    (["--checkpoint=somewhere", "--prompt="], r"--prompt is empty"),
    (["--checkpoint=", "--prompt=x"], r"--checkpoint is empty"),
    (["--checkpoint=somewhere", "--prompt=x", "--max_new_tokens=0"], r"--max_new_tokens=0 must be a positive integer"),
    (["--checkpoint=somewhere", "--prompt=x", "--temperature=-1"], r"temperature=-1\.0 must be a finite number >= 0"),
    (["--checkpoint=somewhere", "--prompt=x", "--temperature=nan"], r"temperature=nan"),
    (["--checkpoint=somewhere", "--prompt=x", "--top_p=0"], r"top_p=0\.0 must be a number in \(0, 1\]"),
    (["--checkpoint=somewhere", "--prompt=x", "--top_k=-1"], r"top_k=-1 must be an integer >= 0"),
    (["--checkpoint=somewhere", "--prompt=x", "--max_new_tokens=many"], r"max_new_tokens.*many"),
]


@pytest.mark.parametrize("args,pattern", GENERATE_USAGE, ids=[" ".join(c[0][-1:]) for c in GENERATE_USAGE])
def test_generate_usage_errors(args, pattern):
    assert_refused(run("generate", *args), 2, pattern)


def test_generate_missing_checkpoint(tmp_path):
    assert_refused(run("generate", f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=x"), 1,
                   r"is not a checkpoint: expected a training workdir")
    (tmp_path / "checkpoints").mkdir()
    assert_refused(run("generate", f"--checkpoint={tmp_path}", "--prompt=x"), 1,
                   r"holds no checkpoint")


def test_generate_on_a_trained_run(trained, tmp_path):
    assert_refused(run("generate", f"--checkpoint={trained}", "--prompt=def f(",
                       "--max_new_tokens=100000"), 2, r"max_new_tokens=100000 leaves no room for a prompt in the model's context \(max_seq_len=512\)")
    assert_refused(run("generate", f"--checkpoint={trained}", "--prompt=x",
                       f"--tokenizer={tmp_path / 'missing.model'}"), 1, r"missing\.model")


@pytest.mark.parametrize("damage", ["truncated_state", "garbage_meta", "empty_step_folder"])
def test_generate_uses_the_newest_checkpoint_that_reads_back(damage, trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    ckpts = workdir / "checkpoints"
    if damage == "truncated_state":
        for f in (ckpts / "4" / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:7])
    elif damage == "garbage_meta":
        (ckpts / "4" / "meta" / "metadata").write_text("garbage")
    else:
        (ckpts / "6").mkdir()
    out = run("generate", f"--checkpoint={workdir}", "--prompt=def f(", "--max_new_tokens=4")
    assert out.returncode == 0, out.stderr[-3000:]
    used = 2 if damage != "empty_step_folder" else 4
    assert re.search(rf"restored the parameters of \S*checkpoints/{used}\b", out.stderr), out.stderr[-3000:]
    assert out.stdout.startswith("def f(")
    assert sorted(os.listdir(ckpts)) == sorted(["2", "4"] + (["6"] if damage == "empty_step_folder" else []))


# ------------------------------------------------------------------------------ convert

CONVERT_USAGE = [
    ([], r"give one command, hf-to-orbax or orbax-to-hf; got \[\]"),
    (["copy"], r"got \['copy'\]"),
    (["hf-to-orbax", "--hf_dir=x"], r"hf-to-orbax needs --out"),
    (["hf-to-orbax", "--out=x"], r"hf-to-orbax needs --hf_dir"),
    (["orbax-to-hf", "--out=x"], r"orbax-to-hf needs --orbax_dir"),
    (["orbax-to-hf", "--orbax_dir=x", "--out=y", "--max_shard_gb=0"], r"--max_shard_gb=0\.0 must be a positive number"),
    (["orbax-to-hf", "--orbax_dir=x", "--out=y", "--dtype=int8"], r"--dtype"),
    (["hf-to-orbax", "--hf_dir=x", "--out=y", "--fp8"], r"--fp8 is an orbax-to-hf option"),
]


@pytest.mark.parametrize("args,pattern", CONVERT_USAGE, ids=[" ".join(c[0]) or "none" for c in CONVERT_USAGE])
def test_convert_usage_errors(args, pattern, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.convert", *args], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert_refused(out, 2, pattern)
    assert "USAGE" not in out.stderr and "flags:" not in out.stderr  # the message alone
    assert os.listdir(tmp_path) == []


def test_convert_bad_sources(tmp_path):
    out_dir = tmp_path / "out"
    assert_refused(run("convert", "hf-to-orbax", f"--hf_dir={tmp_path / 'none'}", f"--out={out_dir}"),
                   1, r"does not exist")
    assert_refused(run("convert", "orbax-to-hf", f"--orbax_dir={tmp_path / 'none'}", f"--out={out_dir}"),
                   1, r"--orbax_dir")
    bad = tmp_path / "bad_hf"
    shutil.copytree(HF_FIXTURE, bad)
    (bad / "config.json").write_text("{garbage")
    assert_refused(run("convert", "hf-to-orbax", f"--hf_dir={bad}", f"--out={out_dir}"), 1,
                   r"config\.json")
    truncated = tmp_path / "truncated_hf"
    shutil.copytree(HF_FIXTURE, truncated)
    for f in truncated.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_refused(run("convert", "hf-to-orbax", f"--hf_dir={truncated}", f"--out={out_dir}"), 1,
                   r"safetensors")
    assert not out_dir.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_convert_never_overwrites(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    assert_refused(run("convert", "hf-to-orbax", f"--hf_dir={HF_FIXTURE}", f"--out={out_dir}"), 1,
                   r"already exists and is not an empty folder")
    assert (out_dir / "precious.txt").read_text() == "keep me"


def test_convert_orbax_to_hf_from_a_damaged_run(trained, tmp_path):
    """orbax-to-hf takes the newest checkpoint that reads back, like generation."""
    workdir = copy_run(trained, tmp_path)
    (workdir / "checkpoints" / "4" / "meta" / "metadata").write_text("[]")
    out = run("convert", "orbax-to-hf", f"--orbax_dir={workdir}", f"--out={tmp_path / 'hf'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"restored the parameters of \S*checkpoints/2\b", out.stderr), out.stderr[-3000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 512
