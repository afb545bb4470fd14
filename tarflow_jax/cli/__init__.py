"""The command lines, each a thin module: parse flags, load, call the library, report.

  python -m tarflow_jax.main      (tarflow-train)     training; the same as tarflow_jax.cli.train
  python -m tarflow_jax.cli.sample    (tarflow-sample)    samples from a checkpoint
  python -m tarflow_jax.cli.evaluate  (tarflow-evaluate)  bpd, classify, fid_stats, fid
  python -m tarflow_jax.cli.convert   (tarflow-convert)   an official PyTorch checkpoint to ours
  python -m tarflow_jax.cli.bench     (tarflow-bench)     timing and utilisation of any config
  python -m tarflow_jax.cli.aot       (tarflow-aot)       ahead-of-time compilation for a TPU slice

Every one runs through `_common.run`, the one place that turns user errors into an `error: ...` line,
and which prepares the process (JAX's platform, host memory) before the command imports TensorFlow
or starts JAX's backends. Importing this package only quiets TensorFlow's C++ start-up notes.
"""

from tarflow_jax.cli import _common  # pylint: disable=unused-import
