r"""ImageNet 64x64, class-conditional (paper: FID about 2.7 to 2.9 with guidance).

  python -m tarflow_jax.main --config=configs/imagenet64_cond.py --workdir=DIR

Mirrors the reference README's "Conditional ImageNet64" training command:
`train.py --dataset=imagenet --img_size=64 --channel_size=3 --patch_size=2 --channels=768
--blocks=8 --layers_per_block=8 --noise_std=0.05 --batch_size=256 --epochs=200 --lr=1e-4 --nvp
--cfg=0 --drop_label=0.1` (bfloat16 autocast), and its FID command
`evaluate_fid.py --dataset=imagenet --img_size=64 ... --noise_std=0.05 --cfg=2.3 --nvp`, which
always samples with `annealed_guidance=True`, under bfloat16, with one self-denoising step at
`--self_denoising_lr=1.0` (our `denoise_scale`), 50,000 samples. Optimiser and schedule are
config_lib's defaults, which are the reference's: AdamW(0.9, 0.95, weight decay 1e-4), one epoch
of linear warm-up from 1e-6, cosine to 1e-6.

Data: `--dataset=imagenet` is full ImageNet (an ImageFolder of the training images) with
Resize(64) (the shorter side), CenterCrop(64) and a random horizontal flip. Here: TFDS
`imagenet2012` (ILSVRC2012 tars in `downloads/manual`, then `tfds build imagenet2012`), resized
(shorter side, antialiased) and centre-cropped on the fly by `tarflow_jax.data`, flipped at random.
Faster alternative: `--config.data.name=imagenet_resized/64x64` reads TFDS's pre-resized 64x64
ImageNet (smaller and quicker to read, but each whole image is squashed to 64x64 rather than
centre-cropped, so it is not the reference's data: FID against the reference's statistics shifts).

Deliberate differences, none of which changes the function trained: `remat`, `scan_layers`, the
FSDP mesh and `grad_accum_steps` size memory for TPUs (the same batch of 256 per update). The
training command's `--cfg=0` only sets the guidance of train.py's in-training FID; our sample
grids while training use the FID settings below.
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                 nvp=True, num_classes=1000, dtype='bfloat16')
  c.data.update(source='tfds', name='imagenet2012', train_split='train', eval_split='validation', flip=True)
  c.noise.update(type='gaussian', std=0.05)
  c.label_drop = 0.1
  # The batch in two halves: one half's activations fit a v4-8 (64 examples per chip).
  config_lib.tpu_sized(c, batch_size=256, grad_accum_steps=2)
  c.num_epochs = 200.0
  c.optim.lr = 1e-4
  # evaluate_fid.py: --cfg=2.3, annealed_guidance=True, --self_denoising_lr=1.0, --attn_temp=1.0.
  c.sample.update(guidance=2.3, guide_what='ab', attn_temp=1.0, annealed_guidance=True, denoise=True,
                  denoise_scale=1.0)
  return config_lib.finalize(c, arg)
