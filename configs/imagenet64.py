r"""ImageNet 64x64, unconditional generation (paper: FID 18.4 with guidance by attention temperature).

  python -m tarflow_jax.main --config=configs/imagenet64.py --workdir=DIR

8 blocks x 8 layers, width 768, patch 2 (1,024 tokens of dim 12), Gaussian noise std 0.05,
bfloat16 matmuls. Data: TFDS `imagenet_resized/64x64` (prepare it with
`tfds build imagenet_resized/64x64`; it needs ImageNet's manual download).
`configs/imagenet64.py:smoke` shrinks it to a CPU run of a few steps on the same data and preprocessing;
`:cpu_digits` runs that shrink on the embedded digits instead, with no dataset.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                 num_classes=0, dtype='bfloat16')
  c.data.update(source='tfds', name='imagenet_resized/64x64', train_split='train', eval_split='validation')
  c.noise.update(type='gaussian', std=0.05)
  # TPU-sized: each layer recomputed in the backward pass (one scan per block), parameters and Adam
  # moments sharded over every chip (`python -m tarflow_jax.cli.aot` shows what each slice needs).
  c.model.update(remat=True, scan_layers=True)
  c.mesh.update(data=1, fsdp=-1)
  c.grad_accum_steps = 2  # the batch in two halves: one half's activations fit a v4-8 (64 examples per chip)
  c.batch_size = 256
  c.num_epochs = 200.0
  c.optim.lr = 1e-4
  c.sample.update(guidance=1.0, attn_temp=0.7)  # unconditional: guidance by attention temperature
  return config_lib.finalize(c, arg)
