r"""ImageNet 64x64 density estimation (paper: 2.99 bits/dim).

  python -m tarflow_jax.main --config=configs/imagenet64_bpd.py --workdir=DIR

The imagenet64 model with uniform dequantisation instead of Gaussian noise, float32
throughout, 100 epochs, on the 64x64 downsampled ImageNet of van den Oord et al.
(TFDS `downsampled_imagenet/64x64`, whose images are downsampled with the box filter the
likelihood literature uses). Evaluate with `python -m tarflow_jax.cli.evaluate bpd`.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                 num_classes=0, dtype='float32')
  c.data.update(source='tfds', name='downsampled_imagenet/64x64', train_split='train', eval_split='validation',
                flip=False)
  c.noise.update(type='uniform', std=0.0)
  # TPU-sized: each layer recomputed in the backward pass (one scan per block), parameters and Adam
  # moments sharded over every chip (`python -m tarflow_jax.cli.aot` shows what each slice needs).
  c.model.update(remat=True, scan_layers=True)
  c.mesh.update(data=1, fsdp=-1)
  c.grad_accum_steps = 2  # the batch in two halves: one half's activations fit a v4-8 (64 examples per chip)
  c.batch_size = 256
  c.num_epochs = 100.0
  c.sample.update(denoise=False)
  return config_lib.finalize(c, arg)
