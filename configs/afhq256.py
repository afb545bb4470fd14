r"""AFHQ 256x256 (cat, dog, wild), class-conditional; the official released checkpoint's model.

  python -m tarflow_jax.main --config=configs/afhq256.py --workdir=DIR \
      --config.data.data_dir=/path/to/afhq

8 blocks x 8 layers, width 768, patch 8 (1,024 tokens of dim 192), noise std 0.07, 3 classes,
batch 256, 4000 epochs. Data: an image folder with one subfolder per class (train/ and val/), as
the reference reads it. Convert the official checkpoint with
`python -m tarflow_jax.cli.convert --config=configs/afhq256.py --checkpoint=afhq_model_8_768_8_8_0.07.pth --output=DIR`.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=256, patch_size=8, channels=768, num_blocks=8, layers_per_block=8,
                 num_classes=3, dtype='bfloat16')
  c.data.update(source='folder', name='afhq', train_split='train', eval_split='val')
  c.noise.update(type='gaussian', std=0.07)
  c.label_drop = 0.1
  # TPU-sized: each layer recomputed in the backward pass (one scan per block), parameters and Adam
  # moments sharded over every chip (`python -m tarflow_jax.cli.aot` shows what each slice needs).
  c.model.update(remat=True, scan_layers=True)
  c.mesh.update(data=1, fsdp=-1)
  c.grad_accum_steps = 2  # the batch in two halves: one half's activations fit a v4-8 (64 examples per chip)
  c.batch_size = 256
  c.num_epochs = 4000.0
  c.sample.update(guidance=1.0, guide_what='ab', num=16)
  return config_lib.finalize(c, arg)
