"""Input pipelines: the embedded digits, image folders, IDX files, resizing, evaluation padding, resumable iterators."""

import glob
import gzip
import os
import struct

import jax
import numpy as np
import pytest
from PIL import Image

from tarflow_jax import config_lib, data, evaluation, sharding
from tarflow_jax import model as model_lib
import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(source='embedded_mnist', **data_fields):
  c = config_lib.default()
  c.model.update(in_channels=1, img_size=28)
  c.data.update(source=source, flip=False, **data_fields)
  return c


def write_idx(path, array: np.ndarray) -> None:
  """An IDX file as MNIST's are written (gzipped if `path` ends in .gz): independent of data.read_idx."""
  code = {np.dtype(np.uint8): 0x08, np.dtype('>i4'): 0x0C, np.dtype('>f4'): 0x0D}[array.dtype]
  content = struct.pack('>BBBB', 0, 0, code, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
  content += array.tobytes()
  with (gzip.open if str(path).endswith('.gz') else open)(path, 'wb') as f:
    f.write(content)


def idx_dataset(folder, sizes=(('train', 40), ('t10k', 13))) -> dict:
  """Small IDX files of 6x6 images, each filled with its index, labels index % 10; returns the arrays."""
  arrays = {}
  for prefix, n in sizes:
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 6, 6)).copy()
    images[:, 0, 0] = 255 - images[:, 0, 0]  # not all pixels alike
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), labels)
    arrays[prefix] = images, labels
  return arrays


def idx_config(folder):
  c = config(source='idx', name='fashion_mnist', data_dir=str(folder), train_split='train', eval_split='test',
             shuffle_buffer=64)
  c.model.img_size = 6
  return c


@pytest.mark.parametrize('dtype', [np.uint8, '>i4', '>f4'])
def test_read_idx_reads_every_type_gzipped_or_not(dtype, tmp_path):
  want = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
  for name in ('a.gz', 'a'):
    write_idx(tmp_path / name, want)
    got = data.read_idx(str(tmp_path / name))
    assert got.shape == (2, 3, 4) and got.dtype.isnative
    np.testing.assert_array_equal(got, want)


def test_read_idx_rejects_other_and_truncated_files(tmp_path):
  (tmp_path / 'png').write_bytes(b'\x89PNG\r\n\x1a\n')
  with pytest.raises(ValueError, match='is not an IDX file'):
    data.read_idx(str(tmp_path / 'png'))
  write_idx(tmp_path / 'x', np.zeros((4, 5), np.uint8))
  (tmp_path / 'x').write_bytes((tmp_path / 'x').read_bytes()[:-3])
  with pytest.raises(ValueError, match=r'holds 17 bytes of data, its header says \(4, 5\).*truncated'):
    data.read_idx(str(tmp_path / 'x'))


def test_idx_splits_hold_every_image_and_label_in_order(tmp_path):
  arrays = idx_dataset(tmp_path)
  c = idx_config(tmp_path)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    s = data.get_split(c, split, 8, train=False)
    batches = list(s.batches)
    images = np.concatenate([b['image'][b['mask']] for b in batches])
    labels = np.concatenate([b['label'][b['mask']] for b in batches])
    assert s.num_examples == len(arrays[prefix][0]) and images.shape[1:] == (6, 6, 1)
    np.testing.assert_array_equal(images[..., 0], arrays[prefix][0])
    np.testing.assert_array_equal(labels, arrays[prefix][1])
    assert labels.dtype == np.int32


def test_idx_training_batches_shuffle_and_resume(tmp_path):
  arrays = idx_dataset(tmp_path)
  c = idx_config(tmp_path)
  split = data.get_split(c, 'train', 8, train=True, seed=1)
  first = [next(split.batches) for _ in range(5)]  # 40 images, shuffled over epochs, labels with them
  seen = np.concatenate([b['image'][:, 1, 1, 0] for b in first])
  assert len(set(seen)) > 20 and list(seen) != sorted(seen) and seen.max() < 40
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in first]), seen % 10)
  split.batches.save(str(tmp_path / 'pos'))
  want = [next(split.batches)['image'] for _ in range(3)]
  again = data.get_split(c, 'train', 8, train=True, seed=1)
  again.batches.restore(str(tmp_path / 'pos'))
  np.testing.assert_array_equal([next(again.batches)['image'] for _ in range(3)], want)


def test_missing_idx_files_name_the_debian_package(tmp_path):
  c = idx_config(tmp_path / 'nothing')
  with pytest.raises(data.DatasetNotFoundError, match=r"Dataset 'fashion_mnist' is not installed: no '.*nothing/"
                     r"train-images-idx3-ubyte.gz'.*apt-get install -y dataset-fashion-mnist.*data_dir"):
    data.get_split(c, 'train', 8, train=True)
  c.data.update(data_dir=None)
  assert data.idx_dir(c.data) == '/usr/share/datasets/fashion-mnist'  # where Debian's package puts them
  with pytest.raises(ValueError, match='IDX datasets have splits "train" and "test"'):
    data.get_split(idx_config(tmp_path), 'validation', 8, train=False)


def test_embedded_digits_are_split_with_every_class_in_both():
  images, labels = data.embedded_mnist()
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8 and images.max() == 255
  c = config()
  train = data.get_split(c, 'train', 500, train=False)
  test = data.get_split(c, 'test', 500, train=False)
  assert (train.num_examples, test.num_examples) == (4500, 500)
  test_labels = np.concatenate([b['label'][b['mask']] for b in test.batches])
  np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), np.full(10, 50))
  train_labels = np.concatenate([b['label'][b['mask']] for b in train.batches])
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), np.full(10, 450))


def test_any_prefix_of_the_held_out_digits_has_every_class():
  # The file is sorted by class: `limit` / num_examples=N must not see only 0s and 1s.
  split = data.get_split(config(), 'test', 64, train=False, limit=64)
  labels = np.concatenate([b['label'][b['mask']] for b in split.batches])
  assert split.num_examples == 64 and len(labels) == 64
  assert set(labels) == set(range(10))
  assert np.bincount(labels, minlength=10).min() >= 6  # the classes take turns: 6 or 7 of each
  again = np.concatenate([b['label'] for b in data.get_split(config(), 'test', 500, train=False).batches])
  np.testing.assert_array_equal(again[:64], labels)  # a fixed order
  assert all(set(again[i:i + 10]) == set(range(10)) for i in range(0, 500, 10))


def test_eval_batches_are_padded_and_masked():
  split = data.get_split(config(), 'test', 96, train=False)
  batches = list(split.batches)
  assert [b['image'].shape[0] for b in batches] == [96] * 6
  assert sum(int(b['mask'].sum()) for b in batches) == 500
  assert not batches[-1]['mask'][-1] and not batches[-1]['image'][-1].any()


def test_a_short_batch_is_padded_to_the_batch_size():
  labels = np.array([3, 1], np.int32)
  np.testing.assert_array_equal(data.pad_batch(labels, 4, -1), [3, 1, -1, -1])
  images = np.ones((2, 2, 2, 1), np.uint8)
  padded = data.pad_batch(images, 3)
  assert padded.shape == (3, 2, 2, 1) and padded.dtype == np.uint8 and not padded[2].any()
  assert data.pad_batch(images, 2) is images


@pytest.mark.parametrize('source', ['embedded_mnist', 'folder', 'idx'])
def test_processes_get_equally_many_eval_batches_when_the_split_does_not_divide(source, tmp_path, monkeypatch):
  # 500 held-out digits (or 7 files, 13 IDX images) over 3 processes: shares of 167/167/166 (3/2/2; 5/4/4).
  # Each process must still yield the same number of batches, or the others wait forever on its share of the
  # last global batch.
  if source == 'idx':
    idx_dataset(tmp_path)
  if source == 'folder':
    for i in range(7):
      os.makedirs(tmp_path / 'test' / f'c{i % 2}', exist_ok=True)
      Image.fromarray(np.full((28, 28, 3), 30 * i, np.uint8)).save(tmp_path / 'test' / f'c{i % 2}' / f'{i}.png')
  c = idx_config(tmp_path) if source == 'idx' else config(source, data_dir=str(tmp_path))
  if source == 'folder':
    c.model.in_channels = 3
  global_batch = {'folder': 6, 'idx': 6, 'embedded_mnist': 249}[source]  # local 83: 167 -> 3 batches, 166 -> 2
  whole = [b for b in data.get_split(c, 'test', global_batch, train=False).batches]
  expected = np.concatenate([b['image'][b['mask']] for b in whole])
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  shares, counts = [], []
  for proc in range(3):
    monkeypatch.setattr(jax, 'process_index', lambda proc=proc: proc)
    batches = list(data.get_split(c, 'test', global_batch, train=False).batches)
    assert all(b['image'].shape[0] == global_batch // 3 for b in batches)
    counts.append(len(batches))
    shares.append(np.concatenate([b['image'][b['mask']] for b in batches]))
  assert len(set(counts)) == 1, counts
  assert sum(len(s) for s in shares) == len(expected)
  key = lambda images: sorted(x.tobytes() for x in images)
  assert key(np.concatenate(shares)) == key(expected)  # every example once, over all processes


def test_resize_and_center_crop(tmp_path):
  c = config(source='folder', data_dir=str(tmp_path))
  c.model.update(in_channels=3, img_size=8)
  for cls in ('cat', 'dog'):
    (tmp_path / 'train' / cls).mkdir(parents=True)
  # 16x32 image, black at the sides and white in the middle: resized to 8x16 and center-cropped
  # to 8x8 it is all white.
  wide = np.zeros((16, 32, 3), np.uint8)
  wide[:, 6:26] = 255
  Image.fromarray(wide).save(tmp_path / 'train' / 'dog' / 'a.png')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'train' / 'cat' / 'b.jpg')
  split = data.get_split(c, 'train', 2, train=False)
  batch = next(split.batches)
  assert split.num_examples == 2
  np.testing.assert_array_equal(batch['label'], [0, 1])  # sorted class names, as ImageFolder
  assert batch['image'].shape == (2, 8, 8, 3)
  assert batch['image'][1].min() >= 250 and batch['image'][0].max() <= 5


def test_training_batches_resume_where_they_stopped(tmp_path):
  c = config()
  split = data.get_split(c, 'train', 32, train=True, seed=1)
  next(split.batches)
  split.batches.save(str(tmp_path / 'pos'))
  want = [next(split.batches)['label'] for _ in range(3)]
  again = data.get_split(c, 'train', 32, train=True, seed=1)
  again.batches.restore(str(tmp_path / 'pos'))
  got = [next(again.batches)['label'] for _ in range(3)]
  np.testing.assert_array_equal(got, want)


def test_unknown_source_and_split_are_clear_errors():
  with pytest.raises(ValueError, match='Unknown data.source'):
    data.get_split(config(source='ftp'), 'train', 8, train=True)
  with pytest.raises(ValueError, match='splits "train" and "test"'):
    data.get_split(config(), 'validation2', 8, train=True)


def load_config(name, arg=None):
  return config_lib.load(os.path.join(REPO, 'configs', name) + (f':{arg}' if arg else ''))


@pytest.mark.parametrize('name', sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))))
def test_every_config_divides_over_1_2_4_and_8_devices(name):
  for arg in (None, 'smoke', 'cpu_digits'):
    for devices in (1, 2, 4, 8):
      data.check_batch_sizes(load_config(name, arg), devices)


def test_a_batch_size_that_does_not_divide_over_the_devices_names_the_field():
  c = load_config('demo.py')
  c.eval_batch_size = 250
  with pytest.raises(ValueError, match=r'config.eval_batch_size=250 does not divide over the 8 devices.*'
                                       r'--config.eval_batch_size=248 or 256'):
    data.check_batch_sizes(c, 8)
  data.check_batch_sizes(c, 2)
  c.eval_every = 0  # no evaluation: the eval batch size is not used
  data.check_batch_sizes(c, 8)
  c.batch_size = 12
  with pytest.raises(ValueError, match=r'config.batch_size=12 does not divide over the 8 devices'):
    data.check_batch_sizes(c, 8)


def test_demo_eval_runs_on_8_devices():
  # configs/demo.py's held-out bits/dim, as train.py evaluates it, with the batch split over 8 devices:
  # 500 digits in batches of 256, the last one padded.
  c = load_config('demo.py')
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(c.mesh)
  assert mesh.size == 8
  data.check_batch_sizes(c, mesh.size)
  model = model_lib.from_config(c.model)
  variables = toy.random_variables(model, scale=0.002)
  bpd = evaluation.split_bits_per_dim(model, variables, c, mesh, c.data.eval_split,
                                    num_examples=c.data.num_eval_examples, batch_size=c.eval_batch_size, seed=2)
  assert bpd.shape == (500,) and np.isfinite(bpd).all()
  # The same digits in one unpadded batch on one device.
  one = sharding.make_mesh(c.mesh, jax.devices()[:1])
  whole = evaluation.split_bits_per_dim(model, variables, c, one, c.data.eval_split, batch_size=500, seed=2)
  np.testing.assert_allclose(bpd[:256], whole[:256], rtol=1e-5)  # the same dequantisation noise
  np.testing.assert_allclose(bpd, whole, atol=2e-3)  # the padded batch's noise differs: ~5e-4 apart, images ~1e-2
