r"""ImageNet 64x64 density estimation (paper: 2.99 bits/dim).

  python -m tarflow_jax.main --config=configs/imagenet64_bpd.py --workdir=DIR

Mirrors the reference README's "Unconditional ImageNet64 density modelling" command:
`train.py --dataset=imagenet64 --img_size=64 --channel_size=3 --patch_size=2 --channels=768
--blocks=8 --layers_per_block=8 --noise_type=uniform --batch_size=256 --epochs=100 --lr=1e-4
--nvp` ("16 GPUs, fp32": train.py turns autocast off for uniform noise, so float32 here).
Optimiser and schedule are config_lib's defaults, which are the reference's: AdamW(0.9, 0.95,
weight decay 1e-4), one epoch of linear warm-up from 1e-6, cosine to 1e-6.

Data: the 64x64 downsampled ImageNet of van den Oord et al. (arXiv 1601.06759), TFDS
`downsampled_imagenet/64x64` (box-filter downsampling, as the likelihood literature uses). The
reference's `utils.get_data` flips every training image at random in every run, this one
included: so does this config (`data.flip`). Evaluate with the reference's evaluate_bpd.py
protocol by `python -m tarflow_jax.cli.evaluate bpd`.

Deliberate differences, none of which changes the function trained: `remat`, `scan_layers`, the
FSDP mesh and `grad_accum_steps` size memory for TPUs (the same batch of 256 per update). Sample
grids are not denoised: with uniform dequantisation there is no Gaussian noise level to denoise.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                 nvp=True, num_classes=0, dtype='float32')
  c.data.update(source='tfds', name='downsampled_imagenet/64x64', train_split='train', eval_split='validation',
                flip=True)
  c.noise.update(type='uniform', std=0.0)
  c.label_drop = 0.0
  # The batch in two halves: one half's activations fit a v4-8 (64 examples per chip).
  config_lib.tpu_sized(c, batch_size=256, grad_accum_steps=2)
  c.num_epochs = 100.0
  c.optim.lr = 1e-4
  c.sample.update(guidance=0.0, denoise=False)
  return config_lib.finalize(c, arg)
