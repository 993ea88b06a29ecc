"""The model-update studies by ``config.study``: PC training (``'pct'``, `experiments.update_pct`), BCT
(``'bct'``, `experiments.update_bct`), text-classifier updates (``'text'``, `experiments.update_text`) and
regression-free LQF fine-tuning (``'lqf_pct'``, `experiments.update_lqf`).

  python -m experiments.update --config configs/update_pct_mnist.py --workdir /tmp/update_pct
  python -m experiments.update --config configs/update_bct_mnist.py --workdir /tmp/update_bct
  python -m experiments.update --config configs/update_text_intents.py --workdir /tmp/update_text
  python -m experiments.update --config configs/update_lqf_mnist.py --workdir /tmp/update_lqf

(each study's own module runs it too, e.g. ``python -m experiments.update_pct``). Each model trains in its
own sub-workdir; a re-run reuses finished models and resumes the others. Writes ``results.json`` and the
markdown tables ``results.md`` into the workdir (`experiments.common.run_study`).
"""

from __future__ import annotations

import ml_collections

from experiments import common, update_bct, update_lqf, update_pct, update_text
from lqf.runtime import cli

STUDIES = {"pct": update_pct, "bct": update_bct, "text": update_text, "lqf_pct": update_lqf}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the study named by ``config.study``; writes and returns its results."""
  study = config.get("study")
  if study not in STUDIES:
    raise ValueError(f"config.study={study!r} is unknown: use one of {sorted(STUDIES)}.")
  return common.run_study(STUDIES[study].run, STUDIES[study].markdown, config, workdir)


if __name__ == "__main__":
  cli.launch(run)
