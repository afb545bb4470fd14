r"""ImageNet 128x128, class-conditional (paper: FID 5.03 with guidance).

  python -m tarflow_jax.main --config=configs/imagenet128_cond.py --workdir=DIR

8 blocks x 8 layers, width 1024, patch 4 (1,024 tokens of dim 48), noise std 0.15, batch 768,
320 epochs. Data: TFDS `imagenet2012` (manual download), resized and center-cropped to 128.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=128, patch_size=4, channels=1024, num_blocks=8, layers_per_block=8,
                 num_classes=1000, dtype='bfloat16')
  c.data.update(source='tfds', name='imagenet2012', train_split='train', eval_split='validation')
  c.noise.update(type='gaussian', std=0.15)
  c.label_drop = 0.1
  # TPU-sized: each layer recomputed in the backward pass (one scan per block), parameters and Adam
  # moments sharded over every chip (`python -m tarflow_jax.cli.aot` shows what each slice needs).
  c.model.update(remat=True, scan_layers=True)
  c.mesh.update(data=1, fsdp=-1)
  c.grad_accum_steps = 2  # the paper's batch of 768 in two halves: a v4-32 holds the activations of 24 per chip
  c.batch_size = 768
  c.num_epochs = 320.0
  c.sample.update(guidance=2.0, guide_what='ab')
  return config_lib.finalize(c, arg)
