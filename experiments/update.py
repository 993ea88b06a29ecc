"""Model-update studies: PC training (``config.study='pct'``) or BCT (``'bct'``); `compat.update`.
Regression in text-classifier updates (``'text'``); `compat.text_study`. Regression-free LQF
fine-tuning (``'lqf_pct'``); `compat.lqf_update`.

  python -m experiments.update --config configs/update_pct_mnist.py --workdir /tmp/update_pct
  python -m experiments.update --config configs/update_bct_mnist.py --workdir /tmp/update_bct
  python -m experiments.update --config configs/update_text_intents.py --workdir /tmp/update_text
  python -m experiments.update --config configs/update_lqf_mnist.py --workdir /tmp/update_lqf

Each model trains in its own sub-workdir; a re-run reuses finished models and resumes the others.
Writes ``results.json`` and the markdown tables ``results.md`` into the workdir. Unless a JAX
compilation cache is configured (``JAX_COMPILATION_CACHE_DIR``), one is kept in
``workdir/compilation_cache``: a study compiles the same networks many times (measured on 2 cores:
the PC smoke study 85 s without it, 31 s with it).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, logging
from jax.experimental.compilation_cache import compilation_cache

from compat import lqf_update, text_study, update
from lqf import cli

STUDIES = {**update.STUDIES, "text": (text_study.run_study, text_study.markdown),
           "lqf_pct": (lqf_update.run_study, lqf_update.markdown)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the study named by ``config.study``; writes and returns its results."""
  study = config.get("study")
  if study not in STUDIES:
    raise ValueError(f"config.study={study!r} is unknown: use one of {sorted(STUDIES)}.")
  run_study, markdown = STUDIES[study]
  if not jax.config.jax_compilation_cache_dir:
    compilation_cache.set_cache_dir(os.path.join(workdir, "compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  results = run_study(config, workdir)
  table = markdown(results)
  logging.info("results:\n%s", table)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table)
  return results


if __name__ == "__main__":
  app.run(cli.main_for(run))
