"""TarFlow: Transformer autoregressive normalizing flows in JAX/Flax."""

from tarflow_jax.reference import load_reference_checkpoint
from tarflow_jax.likelihood import bits_per_dim, log_prob, loss
from tarflow_jax.model import Spec, TarFlow, init_variables
from tarflow_jax.sampling import denoise, sample

__all__ = ['Spec', 'TarFlow', 'bits_per_dim', 'denoise', 'init_variables', 'load_reference_checkpoint', 'log_prob',
           'loss', 'sample', 'train_and_evaluate']


def __getattr__(name):
  # Training pulls in TensorFlow (tf.data, TensorBoard writers): imported only when asked for.
  if name == 'train_and_evaluate':
    from tarflow_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
    return train_and_evaluate
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
