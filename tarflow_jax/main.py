r"""The training command: `python -m tarflow_jax.main --config=configs/<experiment>.py --workdir=DIR`.

The command line itself is tarflow_jax/cli/train.py (also `tarflow-train`); see tarflow_jax/cli/
for the others.
"""

from tarflow_jax.cli import train

if __name__ == '__main__':
  train.run()
