"""Orbax checkpoints of a training run: state, data-iterator position and run metadata.

Layout of a workdir::

    workdir/checkpoints/<step>/state   parameters, batch statistics, optimizer state, step (orbax, sharded)
    workdir/checkpoints/<step>/data    the grain iterator state of every process (one file per process)
    workdir/checkpoints/<step>/meta    JSON: the run's config and model description

Orbax writes each step into a temporary directory and renames it when complete, so a run killed while
saving leaves no checkpoint that `latest_step` would return. Every process calls `save`/`restore`
(orbax coordinates the multi-host write; each host writes its own shards and its own iterator state).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class RunCheckpoints:
  """Periodic saves, keeping the last ``max_to_keep``, and restores of the latest step."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2, save_every: int = 1):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                             create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

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
    """
    step = self.latest_step() if step is None else step
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    items = {"state": ocp.args.StandardRestore(template)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_pretrained(workdir: str) -> tuple[dict[str, Any], dict]:
  """The ``{'params', 'batch_stats'}`` variables and the metadata of the latest checkpoint in a workdir.

  Raises:
    FileNotFoundError: when the workdir holds no complete checkpoint.
  """
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint in {workdir!r}")
  manager = ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {workdir!r}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
  manager.close()
  state = restored["state"]
  return {"params": state["params"], "batch_stats": state["batch_stats"]}, restored["meta"]


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records ``config`` in ``workdir/config.json``; refuses a workdir that holds another config's run.

  With ``config.overwrite`` set, the old run's checkpoints are deleted instead (other files stay).
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  current.pop("overwrite", None)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    saved.pop("overwrite", None)
    if saved != current and not config.get("overwrite", False):
      diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      raise ValueError(f"--workdir {workdir} holds a run of a different config (fields {diff} differ): "
                       "use a new --workdir, or --config.overwrite=True to start over there.")
    if saved != current:
      shutil.rmtree(os.path.join(workdir, CHECKPOINT_DIR), ignore_errors=True)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(current, f, indent=2)
