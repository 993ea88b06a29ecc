"""The runtime around the method: what runs an experiment, never imported by the method modules of `lqf`.

The loop (`loop`: resume, divergence guard, metrics, progress), orbax checkpoints and the workdir claim
(`checkpoint`), metric writing (`metric_writer`), interrupts (`interrupt`), data parallelism and
`jax.distributed` (`parallel`), the absl entry points (`cli`) and the config helpers (`config_util`).
The method takes what it needs from here as arguments: `lqf.fit.fit_linearized(..., run=...)` takes the
loop, e.g. ``functools.partial(lqf.runtime.loop.run, checkpoints=..., progress=..., writer=...)``.
"""
