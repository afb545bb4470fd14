r"""MNIST 28x28, class-conditional: the reference's toy run (its train_local.ipynb).

  python -m tarflow_jax.main --config=configs/mnist.py --workdir=DIR

Mirrors the reference notebook `train_local.ipynb`: patch_size 4, channels 128, blocks 4,
layers_per_block 4, noise_std 0.1, batch_size 256, lr 2e-3, epochs 100, 10 classes, float32 (no
autocast), labels never dropped, no flip (Resize to 28 only), AdamW(0.9, 0.95, weight decay 1e-4)
with one epoch of warm-up from 1e-6 and cosine to 1e-6 (config_lib's defaults). Data: TFDS `mnist`
(downloaded by `tfds build mnist`). The notebook samples its grids without guidance and without
denoising, as here. It then uses the model as a Bayes classifier on the clean test images:
`python -m tarflow_jax.cli.evaluate classify` (its `--noise_std` defaults to 0, the same).

Deliberate differences: `grad_accum_steps=4` runs each batch of 256 as four micro-batches of 64
with one update (the same update, up to float rounding): on a CPU the step is then 1.36x faster
than over the whole batch with `remat` (docs/benchmarks.md); on a GPU or TPU,
`--config.grad_accum_steps=1` runs the batch at once. Logging, evaluation and checkpoint intervals
are in steps (the notebook samples every 10 epochs).
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=1, img_size=28, patch_size=4, channels=128, num_blocks=4, layers_per_block=4,
                 nvp=True, num_classes=10, dtype='float32')
  c.grad_accum_steps = 4  # micro-batches of 64: faster on a CPU than the whole batch (docs/benchmarks.md)
  c.data.update(source='tfds', name='mnist', train_split='train', eval_split='test', flip=False)
  c.noise.update(type='gaussian', std=0.1)
  c.label_drop = 0.0  # the notebook never drops labels (so guidance has no unconditional branch to use)
  c.batch_size = 256
  c.num_epochs = 100.0
  c.optim.lr = 2e-3
  c.sample.update(num=100, guidance=0.0, annealed_guidance=False, denoise=False)  # 10 per class, as the notebook
  c.log_every = 50
  c.eval_every = c.sample_every = c.checkpoint_every = 1000
  return config_lib.finalize(c, arg)
