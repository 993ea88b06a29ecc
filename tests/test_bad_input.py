"""The README's bad-input table, one test per row.

Every case must end with ONE line ``error: ...`` on stderr naming what is wrong, the field and the fix,
exit status 2, no traceback, and an earlier run's workdir left exactly as it was (compared file by file,
contents included). Rows whose error comes from flag parsing or needs fake devices run the entry point
as a subprocess; the others call `lqf.runtime.cli.report_errors` (what the entry point calls) in-process.
"""

import errno
import hashlib
import os
import re
import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import finetune, pretrain
from lqf.data import bundled, tfds_source
from lqf.models import create_model
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, config_util, parallel
from lqf.runtime.metric_writer import MetricWriter
from support import ROOT, poison_batches, pretrain_command, pretrain_env, tiny_config
# The entry point through `cli.launch` (one-line flag errors); see the report in docs/reliability.md.
LAUNCH = [sys.executable, "-c",
          "from lqf.runtime import cli; from experiments.pretrain import run; cli.launch(run)"]


def base_config(**changes):
  """The config of the prepared run (4 steps, checkpoints at 2 and 4), with ``changes`` applied."""
  config = tiny_config(steps=4)
  config.checkpoint_every = 2
  config.update_from_flattened_dict(changes)
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A finished run's workdir: config.json, checkpoints/{2,4}, metrics.jsonl, final.json."""
  workdir = str(tmp_path_factory.mktemp("prepared") / "run")
  pretrain.run(base_config(), workdir)
  ckpt_lib.release_locks()  # as the entry point does when the run ends
  return workdir


@pytest.fixture
def workdir(prepared, tmp_path):
  """A copy of the prepared run, and a check that it is untouched at the end of the test."""
  copy = str(tmp_path / "run")
  shutil.copytree(prepared, copy)
  before = digest(copy)
  yield copy
  assert digest(copy) == before, "the earlier run's files were changed"


def digest(root: str) -> dict[str, str]:
  """{relative path: sha256 of the contents} of every file and '' for every directory under root."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for d in dirs:
      out[os.path.relpath(os.path.join(folder, d), root)] = ""
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        out[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def fails_in_one_line(capsys, run, config, workdir, pattern: str) -> str:
  """Runs ``run`` as the entry point does; asserts exit 2 and one stderr line matching ``pattern``."""
  with pytest.raises(SystemExit) as exit_info:
    cli.report_errors(run, config, workdir)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
  assert re.search(pattern, lines[0]), lines[0]
  return lines[0]


# --- Rows checked in-process -------------------------------------------------------------------------

@pytest.mark.parametrize("changes,pattern", [
    ({"data.name": "mnist_5k"}, r"data\.name='mnist_5k' is unknown: use one of \("),
    ({"model.name": "resnet7"}, r"model\.name='resnet7' is unknown: use one of \["),
    ({"data.classes": (0, 12)}, r"data\.classes=\(0, 12\) is outside uci_digits's labels: use class ids "
                                r"in 0\.\.9"),
    ({"data.shots": 500}, r"data\.shots=500 is more than class '0' has in this split \(142 examples\): "
                          r"use data\.shots <= 142"),
    ({"optim.lr": 0.0}, r"config\.optim\.lr=0\.0 must be a positive number \(e\.g\. 0\.1\)"),
    ({"num_steps": -1}, r"config\.num_steps=-1 must be an integer >= 1"),
    ({"batch_size": 0}, r"config\.batch_size=0 must be positive"),
    ({"log_every": 0}, r"config\.log_every=0 must be an integer >= 1"),
    ({"data.name": "cifar10", "data.image_size": 32},
     r"TFDS dataset 'cifar10' is not prepared in .*: run `tfds build cifar10 --data_dir="),
    ({"data.heldout_fraction": 1.5},
     r"data\.heldout_fraction=1\.5 is outside \(0, 1\): use a held-out share such as 0\.2\.$"),
    ({"model.widths": (4, 8)}, r"model\.widths=\(4, 8\) is not 3 positive integers: give one width "
                               r"per stage of resnet8, or None for \(4, 8, 16\)\.$"),
], ids=["unknown_dataset", "unknown_model", "classes_outside_dataset", "more_shots_than_available",
        "nonpositive_lr", "nonpositive_steps", "nonpositive_batch", "nonpositive_interval",
        "tfds_not_prepared", "heldout_fraction_outside_0_1", "wrong_stage_widths"])
def test_bad_config_value(capsys, workdir, tmp_path, changes, pattern):
  config = base_config(overwrite=True, **changes)  # even with overwrite, nothing is deleted
  if changes.get("data.name") == "cifar10":
    config.data.data_dir = str(tmp_path / "tensorflow_datasets")
  fails_in_one_line(capsys, pretrain.run, config, workdir, pattern)


def test_workdir_of_another_config(capsys, workdir):
  fails_in_one_line(capsys, pretrain.run, base_config(num_steps=5), workdir,
                    r"--workdir .* holds a run of a different config \(fields \['num_steps'\] differ\): "
                    r"use a new --workdir, or --config\.overwrite=True")


def test_pretrained_checkpoint_missing(capsys, tmp_path):
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "finetune_mnist",
                                    "method=lqf,shots=5,target=uci_digits")
  config.pretrained.workdir = str(tmp_path / "never_pretrained")
  fails_in_one_line(capsys, finetune.run, config, str(tmp_path / "out"),
                    r"config\.pretrained\.workdir='.*never_pretrained' holds no pretrained checkpoint: run "
                    r"`python -m experiments\.pretrain --config configs/pretrain_mnist\.py "
                    r"--workdir .*` first")
  assert not os.path.exists(tmp_path / "out")


def test_pretrained_checkpoint_of_another_architecture(prepared):
  variables, _ = ckpt_lib.load_pretrained(prepared)
  wider = base_config(**{"model.width": 8})
  with pytest.raises(ValueError, match=r"config\.pretrained\.workdir=P does not fit the model for images "
                                       r"of shape \(8, 8, 1\) \(shape \(16, 2\) instead of \(32, 2\) at "
                                       r"params/head/kernel; .*; 43 more shapes differ\): use the model "
                                       r"config it was trained with\.$"):
    ckpt_lib.check_compatible(variables, create_model(wider.model, 2), (8, 8, 1),
                              source="config.pretrained.workdir=P")
  deeper = base_config(**{"model.name": "resnet14"})
  with pytest.raises(ValueError, match=r"\(missing params/stage1/block2/bn1/bias, "):
    ckpt_lib.check_compatible(variables, create_model(deeper.model, 2), (8, 8, 1))
  # A new head is fine when its paths are skipped; the same architecture passes.
  ckpt_lib.check_compatible(variables, create_model(base_config().model, 7), (8, 8, 1), skip="^params/head/")
  ckpt_lib.check_compatible(variables, create_model(base_config().model, 2), (8, 8, 1))


def test_resuming_a_checkpoint_of_another_architecture(capsys, workdir):
  os.rename(os.path.join(workdir, "config.json"), os.path.join(workdir, "config.json.old"))
  try:
    fails_in_one_line(capsys, pretrain.run, base_config(**{"model.width": 8}), workdir,
                      r"checkpoint .*/checkpoints/4 holds another model's variables \(shape \(16, 2\) "
                      r"instead of \(32, 2\) at params/head/kernel; .*\): use the config it was written "
                      r"with, a new --workdir, or --config\.overwrite=True\.$")
  finally:
    os.replace(os.path.join(workdir, "config.json.old"), os.path.join(workdir, "config.json"))


def test_images_with_other_channels_than_the_checkpoint(prepared):
  variables, _ = ckpt_lib.load_pretrained(prepared)
  with pytest.raises(ValueError, match=r"\(shape \(3, 3, 1, 4\) instead of \(3, 3, 3, 4\) at "
                                       r"params/stem/conv/kernel\): its images had 1 channels but these "
                                       r"have 3: use data with 1 channels or another checkpoint"):
    ckpt_lib.check_compatible(variables, create_model(base_config().model, 2), (32, 32, 3))


def test_corrupt_checkpoint(capsys, prepared, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(prepared, workdir)
  state = os.path.join(workdir, "checkpoints", "4", "state")
  for folder, _, files in os.walk(state):
    for name in files:
      with open(os.path.join(folder, name), "r+b") as f:
        f.write(b"\x00garbage" * 4)
  before = digest(workdir)
  fails_in_one_line(capsys, pretrain.run, base_config(), workdir,
                    r"checkpoint .*/checkpoints/4 cannot be read \(.*\): delete .*/checkpoints/4 to resume "
                    r"from step 2, or start over with --config\.overwrite=True")
  assert digest(workdir) == before


def test_nan_or_inf_in_the_training_images(capsys, tmp_path, monkeypatch):
  poison_batches(monkeypatch, at=3, value=np.nan)
  workdir = str(tmp_path / "run")
  fails_in_one_line(capsys, pretrain.run, base_config(), workdir,
                    r"the training images hold NaN or Inf at step 3: the run stopped without saving a later "
                    r"state and the last good checkpoint is step 2 in .*; check the data \(config\.data\), "
                    r"or set config\.skip_nonfinite=True")
  assert max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))) == 2  # nothing after it


def test_nan_or_inf_in_the_evaluation_images():
  batch = {"image": np.zeros((4, 8, 8, 1), np.float32), "label": np.zeros(4, np.int32),
           "mask": np.ones(4, np.float32)}
  batch["image"][1, 2, 3, 0] = np.inf
  never = lambda *_: pytest.fail("predicted on non-finite images")
  with pytest.raises(ValueError, match=r"evaluation batch 0 holds NaN or Inf pixels: check the test data"):
    parallel.apply_stream(never, [batch])


def test_disk_full(capsys, tmp_path, monkeypatch):
  def no_space(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
  monkeypatch.setattr(MetricWriter, "_flush", no_space)
  fails_in_one_line(capsys, pretrain.run, base_config(), str(tmp_path / "run"),
                    r"No space left on device \(.*/metrics\.jsonl\): free disk space or use another "
                    r"--workdir, then rerun the same command \(it resumes from the last complete "
                    r"checkpoint\)")


def test_unwritable_workdir(capsys, workdir):
  below_a_file = os.path.join(workdir, "final.json", "run")  # tests run as root: chmod would not stop us
  fails_in_one_line(capsys, pretrain.run, base_config(), below_a_file,
                    r"--workdir .*/final\.json/run cannot be used \(Not a directory\): choose a "
                    r"directory you can write to")


def test_debug_errors_keeps_the_traceback(workdir):
  with pytest.raises(ValueError, match="model.name='resnet7' is unknown"):
    cli.report_errors(pretrain.run, base_config(**{"model.name": "resnet7"}), workdir, debug=True)


# --- Rows checked through the entry point ------------------------------------------------------------

@pytest.mark.parametrize("flags,pattern", [
    (["--config=configs/pretrain_mnist.py", "--config.optim.lr=fast"],
     r"^error: flag --config\.optim\.lr=fast: could not convert string to float: 'fast'$"),
    (["--config=configs/pretrain_mnsit.py"],
     r"^error: --config cannot be loaded \(\[Errno 2\] No such file or directory: "
     r"'configs/pretrain_mnsit\.py'\): check the config file path\.$"),
    (["--config=configs/pretrain_mnist.py:shot=5"],
     r"^error: flag --config=configs/pretrain_mnist\.py:shot=5: Error whilst parsing config file: "
     r"ValueError: config argument 'shot' is unknown: use some of \['classes', 'dataset', 'gelu', 'lr', 'model', 'relu', 'steps'\]"),
    (["--config=configs/pretrain_mnist.py:steps=abc"],
     r"^error: flag --config=configs/pretrain_mnist\.py:steps=abc: .*config argument steps='abc' must be an "
     r"integer \(default 150\)"),
    (["--config=configs/pretrain_mnist.py", "--workdir="], r"^error: --config and --workdir are required"),
], ids=["wrong_type", "missing_config_file", "unknown_config_argument", "config_argument_of_wrong_type",
        "missing_workdir"])
def test_bad_command_line(tmp_path, flags, pattern):
  workdir = tmp_path / "run"
  out = subprocess.run(LAUNCH + [f"--workdir={workdir}"] + flags, env=pretrain_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
  assert re.search(pattern, out.stderr.strip()), out.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_batch_not_divisible_by_the_device_count(workdir):
  command = pretrain_command(4, 2, "--config.overwrite=True", f"--workdir={workdir}")
  out = subprocess.run(command, env=pretrain_env(devices=3), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.batch_size=16 is not divisible by the 3 devices: use a multiple of 3 (e.g. 15 or 18).")


@pytest.mark.parametrize("module, config", [
    ("experiments.pretrain", "configs/pretrain_mnist.py"),
    ("experiments.finetune", "configs/finetune_mnist.py"),
    ("experiments.compare", "configs/compare_mnist.py:quick"),
    ("experiments.update", "configs/update_pct_mnist.py:smoke"),
    ("experiments.update_pct", "configs/update_pct_mnist.py:smoke"),
    ("experiments.update_bct", "configs/update_bct_mnist.py:smoke"),
    ("experiments.update_text", "configs/update_text_intents.py:smoke"),
    ("experiments.update_lqf", "configs/update_lqf_mnist.py:quick"),
    ("experiments.forgetting", "configs/forgetting_mnist.py:quick"),
    ("experiments.mislabels", "configs/mislabels_mnist.py:quick"),
    ("experiments.task_arithmetic", "configs/task_arithmetic_mnist.py:quick"),
])
def test_every_entry_point_reports_a_misspelt_field_in_one_line(tmp_path, module, config):
  """The one subprocess smoke test of each entry point (``python -m experiments.<name>``): it loads its
  config and parses its flags through `lqf.runtime.cli.launch`, and a misspelt field is one line (bug:
  `experiments/update.py` ran absl's own flag parser and printed its multi-line error)."""
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "-m", module, f"--config={config}", "--config.nope=1",
                        f"--workdir={workdir}"], env=pretrain_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.startswith("error: --config.nope=1 names a field the config does not have: 'nope'.")
  assert not workdir.exists()



# --- Finetune rows, with data reads forbidden ------------------------------------------------------

def forbid_data_reads(monkeypatch):
  """Makes every read of data or checkpoint arrays fail loudly: a row's error must come from the
  validation that runs before any data is read (or any checkpoint array is loaded)."""
  def forbidden(*args, **kwargs):
    raise AssertionError("data or checkpoint arrays were read before the error")
  monkeypatch.setattr(bundled, "load_split", forbidden)
  monkeypatch.setattr(tfds_source, "TfdsRecords", forbidden)
  monkeypatch.setattr(ckpt_lib, "load_pretrained", forbidden)


def finetune_config(source, **changes):
  """`configs/finetune_mnist.py` on 8-px UCI digits from the pretrained ``source``, with ``changes``."""
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "finetune_mnist",
                                    "method=lqf,shots=5,target=uci_digits")
  config.data.image_size = 8
  config.pretrained.workdir = source
  config.update_from_flattened_dict(changes)
  return config


@pytest.mark.parametrize("changes,pattern", [
    ({"lqf.target_scale": 0.0}, r"config\.lqf\.target_scale=0\.0 must be a positive number"),
    ({"lqf.weight_decay": -0.1}, r"config\.lqf\.weight_decay=-0\.1 must be a number >= 0"),
    ({"data.classes": (5,)}, r"config\.data\.classes|data\.classes=\(5,\) leaves a one-class task"),
    ({"lqf.head_init": "xavier"}, r"config\.lqf\.head_init='xavier' is unknown: use one of"),
    ({"lqf.cache_features": "sometimes"}, r"config\.lqf\.cache_features='sometimes' is unknown"),
    ({"lqf.trainable": "^stage9/"}, r"config\.lqf\.trainable='\^stage9/' matches no parameter"),
    ({"method": "lqf_relu", "pretrained.relu_workdir": "{source}"},
     r"config\.method='lqf_relu' linearizes a relu network, but config\.pretrained\.relu_workdir=.* holds a "
     r"leaky_relu model: use method='lqf', or a relu checkpoint"),
    ({"data.name": "cifar-10"}, r"data\.name='cifar-10' is unknown: use one of \("),
    ({"nonlinear.learning_rate": -1.0},
     r"config\.nonlinear\.learning_rate=-1\.0 must be a positive number"),
], ids=["zero_target_scale", "negative_weight_decay", "one_class_task", "unknown_head_init",
        "unknown_cache_mode", "trainable_matches_nothing", "method_contradicts_checkpoint",
        "tfds_name_typo", "negative_nonlinear_lr"])
def test_bad_value_fails_before_any_data_is_read(capsys, monkeypatch, prepared, tmp_path, changes, pattern):
  """Finetune rows: exit 2, one line, no data read, nothing written."""
  run_dir = tmp_path / "run"
  changes = {k: v.format(source=prepared) if isinstance(v, str) else v for k, v in changes.items()}
  config = finetune_config(prepared, **changes)
  before = digest(prepared)
  forbid_data_reads(monkeypatch)
  fails_in_one_line(capsys, finetune.run, config, str(run_dir), pattern)
  assert not run_dir.exists() and digest(prepared) == before


def test_a_workdir_held_by_a_live_run_is_refused(workdir):
  """A second run on a workdir whose lock names a live process stops at once; a stale lock (dead pid)
  is taken over (`lqf.runtime.checkpoint.claim_workdir`)."""
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    with open(os.path.join(workdir, ckpt_lib.LOCK_FILE), "w") as f:
      json.dump({"pid": holder.pid, "host": socket.gethostname()}, f)
    before = digest(workdir)
    out = subprocess.run(pretrain_command(4, 2, f"--workdir={workdir}"), env=pretrain_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.search(rf"--workdir .* is in use by another run \(pid {holder.pid} on .*\): wait for it",
                     out.stderr), out.stderr
    assert digest(workdir) == before
  finally:
    holder.kill()
    holder.wait()
  os.remove(os.path.join(workdir, ckpt_lib.LOCK_FILE))  # the fixture compares with the prepared run


def test_a_stale_lock_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / ckpt_lib.LOCK_FILE, "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
  ckpt_lib.claim_workdir(str(workdir), base_config())
  with open(workdir / ckpt_lib.LOCK_FILE) as f:
    assert json.load(f)["pid"] == os.getpid()
  ckpt_lib.release_locks()
  assert not (workdir / ckpt_lib.LOCK_FILE).exists()


def test_damaged_latest_step_names_the_intact_one(capsys, prepared, tmp_path):
  source = str(tmp_path / "source")
  shutil.copytree(prepared, source)
  with open(os.path.join(source, "checkpoints", "4", "state", "_METADATA"), "w") as f:
    f.write("garbage")
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "finetune_mnist",
                                    "method=lqf,shots=5,target=uci_digits")
  config.data.image_size = 8
  config.pretrained.workdir = source
  fails_in_one_line(capsys, finetune.run, config, str(tmp_path / "out"),
                    r"checkpoint .*/checkpoints/4 cannot be read \(.*\): delete .*/checkpoints/4 to use "
                    r"step 2 \(intact steps are kept\), or rerun the pretraining")


def test_help_shows_the_config_docstring():
  out = subprocess.run([sys.executable, "-m", "experiments.finetune", "--help",
                        "--config=configs/finetune_mnist.py"], env=pretrain_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "One fine-tuning run" in out.stdout  # the entry point's docstring
  assert "Arguments: ``method`` (any of `lqf.methods`: lqf, lqf_relu" in out.stdout  # the config's
