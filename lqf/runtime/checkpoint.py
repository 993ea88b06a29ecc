"""Orbax checkpoints of a training run: state, data-iterator position and run metadata.

Layout of a workdir (a local path or an object-store path such as ``gs://bucket/run``)::

    workdir/config.json                the run's config (`claim_workdir`)
    workdir/.lock                      pid and host of the run using the workdir (`claim_workdir`)
    workdir/checkpoints/<step>/state   parameters, batch statistics, optimizer state, step (orbax, sharded)
    workdir/checkpoints/<step>/data    the grain iterator state of every process (one file per process)
    workdir/checkpoints/<step>/meta    JSON: the run's config and model description

Orbax writes each step into a temporary directory (``<step>.orbax-checkpoint-tmp-*``) and renames it
when complete, so a run killed while saving leaves no checkpoint that `latest_step` would return; such
leftovers are deleted when the next run opens the directory. Every process calls `save`/`restore`
(orbax coordinates the multi-host write; each host writes its own shards and its own iterator state).
A checkpoint that cannot be read, or that was written for another model, is reported in one line that
names the step directory and the fix; it is never modified.

A workdir holds one run at a time: `claim_workdir` takes ``workdir/.lock`` (the owner's pid and host)
and refuses a workdir whose lock belongs to another live process; a lock left by a killed run (its pid
is gone) is recognised as stale and taken over. `release_locks` (called by `lqf.runtime.cli` when the run ends,
and at exit) removes the locks this process took.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import socket
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization, traverse_util

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
_held_locks: set[str] = set()
VARIABLE_COLLECTIONS = ("params", "batch_stats")
_SHOWN = 3  # differing paths named per kind in a mismatch message


def as_path(path: str) -> epath.Path:
  """``path`` as an `epath.Path`: made absolute when local, as given for ``gs://...`` and the like."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler()}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{'stage1/block1/conv1/kernel': shape}`` of a nested dict of arrays (or of array metadata)."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def _model_variables(tree: Any) -> dict:
  """The ``params``/``batch_stats`` collections of a state, a checkpoint's state or its metadata.

  A training loop's checkpoint holds ``{'loop': LoopState, 'loss': ...}`` with the model's state in
  ``loop.state`` (`lqf.runtime.loop`); a dict that holds ``params`` itself is taken as it is. A state without
  parameters (a linearized fit's δ) gives {}.
  """
  tree = serialization.to_state_dict(tree)
  if isinstance(tree, dict) and "loop" in tree:
    tree = tree["loop"]["state"]
  if not isinstance(tree, dict):
    return {}
  return {c: tree[c] for c in VARIABLE_COLLECTIONS if c in tree}


def _variable_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`_shapes` of the ``params`` and ``batch_stats`` collections, paths prefixed by the collection."""
  tree = _model_variables(tree)
  return {f"{c}/{k}": v for c in VARIABLE_COLLECTIONS if c in tree for k, v in _shapes(tree[c]).items()}


def describe_mismatch(found: dict[str, tuple[int, ...]],
                      expected: dict[str, tuple[int, ...]]) -> str | None:
  """One phrase naming the paths that differ between two ``{path: shape}`` dicts; None when equal.

  E.g. ``"missing params/stage3/block1/conv1/kernel; unexpected params/stage4/...; shape (3, 3, 1, 4)
  instead of (3, 3, 3, 4) at params/stem/conv/kernel"``, at most three paths of each kind.
  """
  order = lambda path: (not path.startswith("params/"), path)  # parameters first, then statistics

  def some(paths):
    paths = sorted(paths, key=order)
    more = f" (+{len(paths) - _SHOWN} more)" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more
  missing = expected.keys() - found.keys()
  unexpected = found.keys() - expected.keys()
  reshaped = [k for k in found.keys() & expected.keys() if found[k] != expected[k]]
  parts = []
  if missing:
    parts.append(f"missing {some(missing)}")
  if unexpected:
    parts.append(f"unexpected {some(unexpected)}")
  for k in sorted(reshaped, key=order)[:_SHOWN]:
    parts.append(f"shape {found[k]} instead of {expected[k]} at {k}")
  if len(reshaped) > _SHOWN:
    parts.append(f"{len(reshaped) - _SHOWN} more shapes differ")
  return "; ".join(parts) or None


def check_compatible(variables: dict, model: nn.Module, input_shape: tuple[int, ...], *,
                     source: str = "the pretrained checkpoint", skip: str | None = None) -> None:
  """Fails unless ``variables`` have exactly the paths and shapes ``model`` creates for these inputs.

  The model's variables are traced with ``jax.eval_shape`` (nothing is computed) on one image of
  ``input_shape`` = (H, W, C) and compared with ``variables['params']`` and
  ``variables['batch_stats']`` path by path.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` (arrays or anything with ``.shape``).
    model: the network the variables will be used with.
    input_shape: (H, W, C) of the images the model will see.
    source: what ``variables`` are, for the message (e.g. "config.pretrained.workdir=/tmp/p").
    skip: a regex; paths (``params/head/kernel``) it matches are not compared, e.g. ``'^params/head/'``
      when the head is replaced.

  Raises:
    ValueError: one line naming the differing paths (missing, unexpected, different shape) and, when
      the first convolution's input channels differ, the image channels the checkpoint expects.
  """
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape), jnp.float32))
  found, want = _variable_shapes(variables), _variable_shapes(expected)
  if skip:
    found = {k: v for k, v in found.items() if not re.search(skip, k)}
    want = {k: v for k, v in want.items() if not re.search(skip, k)}
  problem = describe_mismatch(found, want)
  if problem is None:
    return
  hint = "use the model config it was trained with"
  stem = "params/stem/conv/kernel"
  if stem in found and stem in want and found[stem][2] != want[stem][2]:
    hint = (f"its images had {found[stem][2]} channels but these have {input_shape[-1]}: use data with "
            f"{found[stem][2]} channels or another checkpoint")
  raise ValueError(f"{source} does not fit the model for images of shape {tuple(input_shape)} "
                   f"({problem}): {hint}.")


class RunCheckpoints:
  """Periodic saves, keeping the last ``max_to_keep``, and restores of the latest step."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2, save_every: int = 1):
    self.directory = as_path(workdir) / CHECKPOINT_DIR
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                             create=True, cleanup_tmp_directories=True),
        item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save` at ``step`` writes a checkpoint (the interval, or a preemption signal)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, *, data_iterator: Any = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Saves ``state`` (and the iterator position) at ``step`` if the interval says so or ``force``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, state_template: Any, *, step: int | None = None,
              data_iterator: Any = None) -> Any:
    """Restores the state at ``step`` (default latest) into the structure/shardings of the template.

    ``data_iterator``, when given, is moved in place to the saved position.

    Raises:
      ValueError: the checkpoint holds another model's variables (the paths are named), or cannot be
        read (corrupt or written by another version of the code).
    """
    step = self.latest_step() if step is None else step
    where = self.directory / str(step)
    earlier = [s for s in self._manager.all_steps() if s < step]
    fix = (f"delete {where} to resume from step {max(earlier)}" if earlier else f"delete {where}") + \
        ", or start over with --config.overwrite=True"
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    items = {"state": ocp.args.StandardRestore(template)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      saved = _saved_state(self._manager, step)
      problem = describe_mismatch(_variable_shapes(saved), _variable_shapes(state_template))
      restored = None if problem else self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      raise ValueError(f"checkpoint {where} cannot be read ({_first_line(e)}): {fix}.") from e
    if problem:
      raise ValueError(f"checkpoint {where} holds another model's variables ({problem}): use the "
                       f"config it was written with, a new --workdir, or --config.overwrite=True.")
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _saved_state(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved state's tree of array metadata (``.shape``, ``.dtype``), read without the arrays."""
  saved = manager.item_metadata(step)["state"]
  return saved.tree if hasattr(saved, "tree") else saved


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def load_pretrained(workdir: str) -> tuple[dict[str, Any], dict]:
  """The ``{'params', 'batch_stats'}`` variables and the metadata of the latest checkpoint in a workdir.

  The arrays are placed on this process's first device, whatever the devices that wrote them (e.g. a
  TPU pod's checkpoint read on a laptop).

  Raises:
    FileNotFoundError: when the workdir holds no complete checkpoint.
    ValueError: when the latest checkpoint cannot be read.
  """
  directory = as_path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {workdir!r}")
  manager = ocp.CheckpointManager(directory, item_handlers=_handlers())
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {workdir!r}")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          _saved_state(manager, step))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    earlier = [s for s in manager.all_steps() if s < step]
    fix = (f"delete {directory / str(step)} to use step {max(earlier)} (intact steps are kept), or rerun "
           f"the pretraining into a new --workdir" if earlier else
           "rerun the pretraining into a new --workdir")
    raise ValueError(f"checkpoint {directory / str(step)} cannot be read ({_first_line(e)}): {fix}.") from e
  finally:
    manager.close()
  return _model_variables(restored["state"]), restored["meta"]


def pretrained_meta(workdir: str) -> dict:
  """The JSON metadata (the run's config, ...) of the latest checkpoint in a workdir; no arrays are read.

  Raises:
    FileNotFoundError: when the workdir holds no complete checkpoint.
    ValueError: when that metadata cannot be read.
  """
  directory = as_path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {workdir!r}")
  manager = ocp.CheckpointManager(directory, item_handlers=_handlers())
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {workdir!r}")
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"checkpoint {directory} cannot be read ({_first_line(e)}): rerun the pretraining "
                     "into a new --workdir.") from e
  finally:
    manager.close()


def _owner(lock: str) -> dict | None:
  """The {'pid', 'host'} recorded in a lock file, or None when it is missing or unreadable."""
  try:
    with open(lock) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _alive(owner: dict) -> bool:
  """Whether the lock's owner still runs: a live pid on this host (another host's lock: assumed live)."""
  if owner.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(owner["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError, TypeError):
    return True
  return True


def check_not_locked(workdir: str) -> None:
  """Raises ValueError when another live run holds ``workdir`` (a local path); reads nothing else.

  Only process 0 takes and checks locks: the other processes of a distributed run share its workdir.
  """
  if "://" in str(workdir) or jax.process_index() != 0:
    return
  owner = _owner(os.path.join(os.path.abspath(workdir), LOCK_FILE))
  if owner and owner.get("pid") != os.getpid() and _alive(owner):
    raise ValueError(f"--workdir {workdir} is in use by another run (pid {owner.get('pid')} on "
                     f"{owner.get('host')}): wait for it to finish or use another --workdir (a lock "
                     f"left by a killed run is removed automatically; {LOCK_FILE} names the owner).")


def _lock(root: str) -> None:
  """Takes ``root/.lock`` for this process; a stale lock (dead pid) is replaced."""
  path = os.path.join(root, LOCK_FILE)
  if path in _held_locks:
    return
  check_not_locked(root)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
  os.replace(tmp, path)
  _held_locks.add(path)


def lock_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed and takes its lock (a study's workdir, whose runs live in sub-workdirs
  claimed one by one); refuses one held by another live run."""
  if "://" in str(workdir) or jax.process_index() != 0:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be used ({e.strerror or e}): choose a directory you "
                     "can write to.") from None
  _lock(os.path.abspath(workdir))


def release_locks() -> None:
  """Removes the workdir locks this process took (`claim_workdir`)."""
  for path in list(_held_locks):
    owner = _owner(path)
    if owner and owner.get("pid") == os.getpid():
      try:
        os.remove(path)
      except OSError:
        pass
    _held_locks.discard(path)


atexit.register(release_locks)


def _config_record(config: ml_collections.ConfigDict) -> dict:
  record = json.loads(config.to_json_best_effort())
  record.pop("overwrite", None)
  return record


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Fails, writing nothing, unless `claim_workdir` would accept ``workdir`` for ``config``.

  The workdir must be (or be creatable as) a writable directory, not held by another live run, and not
  hold a run of another config (unless ``config.overwrite``).

  Raises:
    ValueError: one line naming the problem and the fix.
  """
  check_not_locked(workdir)
  root = as_path(workdir)
  unusable = lambda why: ValueError(  # noqa: E731
      f"--workdir {workdir} cannot be used ({why}): choose a directory you can write to.")
  try:
    if root.exists():
      if not root.is_dir():
        raise unusable("Not a directory")
      saved = json.loads((root / CONFIG_FILE).read_text()) if (root / CONFIG_FILE).exists() else None
    else:
      saved = None
      if "://" not in str(workdir):
        parent = os.path.dirname(os.path.abspath(workdir))
        while not os.path.exists(parent):
          parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
          raise unusable("Not a directory")
        if not os.access(parent, os.W_OK):
          raise unusable("Permission denied")
  except OSError as e:
    raise unusable(e.strerror or e) from None
  if saved is None:
    return
  saved.pop("overwrite", None)
  current = _config_record(config)
  if saved != current and not config.get("overwrite", False):
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise ValueError(f"--workdir {workdir} holds a run of a different config (fields {diff} differ): "
                     "use a new --workdir, or --config.overwrite=True to start over there.")


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records ``config`` in ``workdir/config.json`` after `check_workdir`; takes the workdir's lock.

  With ``config.overwrite`` set, an old run of another config has its checkpoints deleted (other files
  stay). Process 0 deletes and writes (atomically: a temporary file renamed); all processes then meet
  at a barrier, so none starts reading checkpoints before the workdir is settled.

  Raises:
    ValueError: see `check_workdir`; or the workdir cannot be created or written.
  """
  check_workdir(workdir, config)
  root = as_path(workdir)
  path = root / CONFIG_FILE
  current = _config_record(config)
  if jax.process_index() == 0:
    try:
      root.mkdir(parents=True, exist_ok=True)
      saved = json.loads(path.read_text()) if path.exists() else current
      saved.pop("overwrite", None)
      if "://" not in str(workdir):
        _lock(str(root))
      if saved != current and (root / CHECKPOINT_DIR).exists():
        (root / CHECKPOINT_DIR).rmtree()
      tmp = root / f"{CONFIG_FILE}.tmp"
      tmp.write_text(json.dumps(current, indent=2))
      tmp.replace(path)
    except OSError as e:
      raise ValueError(f"--workdir {workdir} is not writable ({e.strerror or e}): free space or "
                       "choose a directory you can write to.") from None
  _barrier("claim_workdir")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
