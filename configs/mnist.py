r"""MNIST 28x28, class-conditional: the reference's toy run.

  python -m tarflow_jax.main --config=configs/mnist.py --workdir=DIR

4 blocks x 4 layers, width 128, patch 4 (49 tokens of dim 16), noise std 0.1, lr 2e-3, batch 256,
10 classes. Data: TFDS `mnist` (downloaded by `tfds build mnist`). The reference trains it for a
few epochs and uses it as a Bayes classifier (`python -m tarflow_jax.cli.evaluate classify`).
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=1, img_size=28, patch_size=4, channels=128, num_blocks=4, layers_per_block=4,
                 num_classes=10, dtype='float32')
  # On a CPU the two together shrink the training step's XLA buffers at the same speed (README, figures);
  # the checkpoints are the same either way.
  c.model.update(remat=True, scan_layers=True)
  c.data.update(source='tfds', name='mnist', train_split='train', eval_split='test', flip=False)
  c.noise.update(type='gaussian', std=0.1)
  c.label_drop = 0.1
  c.batch_size = 256
  c.num_epochs = 20.0
  c.optim.lr = 2e-3
  c.sample.update(num=100, guidance=1.0)
  c.log_every = 50
  c.eval_every = c.sample_every = c.checkpoint_every = 1000
  return config_lib.finalize(c, arg)
