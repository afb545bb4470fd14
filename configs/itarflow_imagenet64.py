r"""iTARFlow, ImageNet 64x64, class-conditional (apple/ml-itarflow; arXiv 2604.20041).

  python -m tarflow_jax.main --config=configs/itarflow_imagenet64.py --workdir=DIR

Mirrors ml-itarflow's README "ImageNet 64x64" training command:
`train.py --dataset imagenet --img_size 64 --patch_sizes 2 --channels 1280
--layers_per_block 4 4 4 24 --batch_size 512 --epochs 300 --cfg 2.1 --drop_label 0.1
--t0 1e-2 --t1 3e-1 --reweight t --xflip 1` (train.py's defaults: `--blocks 4 --channel_size 3 --nvp 1
--lr 1e-4 --t_sample uni --shared_backbone_layers 0`, bfloat16 autocast; AdamW(0.9, 0.95, weight decay
1e-4), one epoch of linear warm-up from 1e-5, cosine to 1e-5), and its FID command
`evaluate_fid.py ... --cfg 2.1 --t0 1e-2 --t1 3e-1` (its defaults: annealed guidance, `--lerp_style
tarflow`, `--guide_flows -1`, `--dyn ode`, `--clip 0`, `--itr_steps` None, i.e. int(t1 / 1e-2) = 30).

Data: `--dataset imagenet` with `--xflip 1` is full ImageNet with Resize(64) (the shorter side),
CenterCrop(64) and a random horizontal flip; here TFDS `imagenet2012`, resized and centre-cropped on the
fly by `tarflow_jax.data` (see configs/imagenet64_cond.py).

Deliberate differences, none of which changes the function trained: `remat`, `scan_layers`, the FSDP
mesh and `grad_accum_steps` (`config_lib.tpu_sized`) size memory for TPUs (the same batch of 512 per
update). It compiles for and fits a v5litepod-8 (`--topology=v5e:2x4`): 15.45 GiB of 15.75 per chip for training
(`python -m tarflow_jax.cli.aot`; docs/benchmarks.md).
"""

from tarflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.default()
  config_lib.set_fields(c.model, in_channels=3, img_size=64, patch_size=2, channels=1280, num_blocks=4,
                        layers_per_block=(4, 4, 4, 24), nvp=True, num_classes=1000, dtype='bfloat16',
                        noise_conditioning=True)
  c.data.update(source='tfds', name='imagenet2012', train_split='train', eval_split='validation', flip=True)
  c.label_drop = 0.1
  config_lib.tpu_sized(c, batch_size=512, grad_accum_steps=2)
  c.num_epochs = 300.0
  c.optim.update(lr=1e-4, min_lr=1e-5)
  c.itarflow.update(t0=1e-2, t1=3e-1, t_sample='uniform', reweight='t', steps=30, dynamics='ode', clip=False,
                    guidance_style='tarflow', guide_flows=-1)
  c.sample.update(guidance=2.1, attn_temp=1.0, annealed_guidance=True)
  return config_lib.finalize(c, arg)
