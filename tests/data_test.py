"""Input pipelines: the embedded digits, image folders, resizing, evaluation padding, resumable iterators."""

import numpy as np
import pytest
from PIL import Image

from tarflow_jax import config_lib, data


def config(source='embedded_mnist', **data_fields):
  c = config_lib.default()
  c.model.update(in_channels=1, img_size=28)
  c.data.update(source=source, flip=False, **data_fields)
  return c


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


def test_eval_batches_are_padded_and_masked():
  split = data.get_split(config(), 'test', 96, train=False)
  batches = list(split.batches)
  assert [b['image'].shape[0] for b in batches] == [96] * 6
  assert sum(int(b['mask'].sum()) for b in batches) == 500
  assert not batches[-1]['mask'][-1] and not batches[-1]['image'][-1].any()


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
