r"""AFHQ 256x256 (cat, dog, wild), class-conditional; the official released checkpoint's model.

  python -m tarflow_jax.main --config=configs/afhq256.py --workdir=DIR \
      --config.data.data_dir=/path/to/afhq

Mirrors the reference README's "AFHQ" command: `train.py --dataset=afhq --img_size=256
--channel_size=3 --patch_size=8 --channels=768 --blocks=8 --layers_per_block=8 --noise_std=0.07
--batch_size=256 --epochs=4000 --lr=1e-4 --nvp --cfg=0 --drop_label=0.1` (bfloat16 autocast), the
model of the released `afhq_model_8_768_8_8_0.07.pth`. Optimiser and schedule are config_lib's
defaults, which are the reference's: AdamW(0.9, 0.95, weight decay 1e-4), one epoch of linear
warm-up from 1e-6, cosine to 1e-6.

Data: an image folder with one subfolder per class (train/ and val/), as the reference's
ImageFolder reads it, with Resize(256) (the shorter side), CenterCrop(256) and a random horizontal
flip; ours resizes, centre-crops and flips the same way on the fly.

Sampling: the reference gives no FID command for AFHQ; its sample.ipynb draws 16 samples of this
model at guidance 0 and 1 (not annealed, bfloat16) and then takes one denoising step at the
theoretical step size. This config samples 16 at guidance 1, not annealed, denoised at scale 1.0
(`--config.sample.guidance=0` for the notebook's other grid). (The reference's evaluate_fid.py, if
pointed at AFHQ, would anneal: `--config.sample.annealed_guidance=True` does the same.)

Deliberate differences, none of which changes the function trained: `remat`, `scan_layers`, the
FSDP mesh and `grad_accum_steps` size memory for TPUs (the same batch of 256 per update). Convert
the official checkpoint with
`python -m tarflow_jax.cli.convert --config=configs/afhq256.py --checkpoint=afhq_model_8_768_8_8_0.07.pth --output=DIR`.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=256, patch_size=8, channels=768, num_blocks=8, layers_per_block=8,
                 nvp=True, num_classes=3, dtype='bfloat16')
  c.data.update(source='folder', name='afhq', train_split='train', eval_split='val', flip=True)
  c.noise.update(type='gaussian', std=0.07)
  c.label_drop = 0.1
  # The batch in two halves: one half's activations fit a v4-8 (64 examples per chip).
  config_lib.tpu_sized(c, batch_size=256, grad_accum_steps=2)
  c.num_epochs = 4000.0
  c.optim.lr = 1e-4
  # sample.ipynb: 16 samples, guidance 1 (and 0), not annealed, then one denoising step.
  c.sample.update(num=16, guidance=1.0, guide_what='ab', attn_temp=1.0, annealed_guidance=False, denoise=True,
                  denoise_scale=1.0)
  return config_lib.finalize(c, arg)
