r"""ImageNet 64x64, unconditional generation (paper: FID 18.4, guided by attention temperature).

  python -m tarflow_jax.main --config=configs/imagenet64.py --workdir=DIR

Mirrors the reference README's "Unconditional ImageNet64 generation" command:
`train.py --dataset=imagenet64 --img_size=64 --channel_size=3 --patch_size=2 --channels=768
--blocks=8 --layers_per_block=8 --noise_std=0.05 --batch_size=256 --epochs=200 --lr=1e-4 --nvp`
(bfloat16 autocast, as train.py uses for Gaussian noise). Optimiser and schedule are config_lib's
defaults, which are the reference's: AdamW(0.9, 0.95, weight decay 1e-4), one epoch of linear
warm-up from 1e-6, cosine to 1e-6.

Data: `--dataset=imagenet64` is the 64x64 downsampled ImageNet of van den Oord et al.
(arXiv 1601.06759), TFDS `downsampled_imagenet/64x64` (its archive goes in `downloads/manual`,
then `tfds build downsampled_imagenet/64x64`). The reference applies Resize(64), CenterCrop(64)
(no-ops at 64x64) and a random horizontal flip in every run: ours flips too (`data.flip`, the
default). `--config.data.name=imagenet_resized/64x64` trains on TFDS's other 64x64 ImageNet
(squashed whole images, not the same data) where that one is at hand.

Sampling (the grids while training, `cli.sample` and FID): annealed guidance as the reference's
evaluate_fid.py always applies it (`annealed_guidance=True`), one self-denoising step at the
theoretical step size (its `--self_denoising_lr=1.0`, our `denoise_scale`). The reference gives no
FID command for this model: its evaluate_fid defaults are `--cfg=0 --attn_temp=1.0` (no
guidance). The guidance weight 1.0 at attention temperature 0.7 is OUR choice, not the
reference's default and not a value we found in the paper's text; set
`--config.sample.guidance=0` (or `attn_temp=1.0`) for the reference's default.

Deliberate differences, none of which changes the function trained: `remat`, `scan_layers`,
the FSDP mesh and `grad_accum_steps` size memory for TPUs (the same batch of 256 per update).
`configs/imagenet64.py:smoke` shrinks it to a CPU run of a few steps on the same data and
preprocessing; `:cpu_digits` runs that shrink on the embedded digits instead, with no dataset.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                 nvp=True, num_classes=0, dtype='bfloat16')
  c.data.update(source='tfds', name='downsampled_imagenet/64x64', train_split='train', eval_split='validation',
                flip=True)
  c.noise.update(type='gaussian', std=0.05)
  c.label_drop = 0.0
  # The batch in two halves: one half's activations fit a v4-8 (64 examples per chip).
  config_lib.tpu_sized(c, batch_size=256, grad_accum_steps=2)
  c.num_epochs = 200.0
  c.optim.lr = 1e-4
  # Guidance by attention temperature: weight and temperature are ours (see the docstring); annealed and
  # denoised as the reference's evaluate_fid.py.
  c.sample.update(guidance=1.0, attn_temp=0.7, annealed_guidance=True, denoise=True, denoise_scale=1.0)
  return config_lib.finalize(c, arg)
