r"""ImageNet 64x64, class-conditional (paper: FID about 2.7 to 2.9 with guidance).

  python -m tarflow_jax.main --config=configs/imagenet64_cond.py --workdir=DIR

The imagenet64 model with 1,000 class embeddings, 10% of labels dropped during training so that
classifier-free guidance can be used when sampling.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                 num_classes=1000, dtype='bfloat16')
  c.data.update(source='tfds', name='imagenet_resized/64x64', train_split='train', eval_split='validation')
  c.noise.update(type='gaussian', std=0.05)
  c.label_drop = 0.1
  # TPU-sized: each layer recomputed in the backward pass (one scan per block), parameters and Adam
  # moments sharded over every chip (`python -m tarflow_jax.cli.aot` shows what each slice needs).
  c.model.update(remat=True, scan_layers=True)
  c.mesh.update(data=1, fsdp=-1)
  c.grad_accum_steps = 2  # the batch in two halves: one half's activations fit a v4-8 (64 examples per chip)
  c.batch_size = 256
  c.num_epochs = 200.0
  c.sample.update(guidance=2.0, guide_what='ab')
  return config_lib.finalize(c, arg)
