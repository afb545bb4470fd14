"""TarFlow: Transformer autoregressive normalizing flows in JAX/Flax."""

from tarflow_jax.convert import load_reference_checkpoint
from tarflow_jax.likelihood import bits_per_dim, log_prob, loss
from tarflow_jax.model import TarFlow, init_variables
from tarflow_jax.sampling import denoise, sample

__all__ = ['TarFlow', 'bits_per_dim', 'denoise', 'init_variables', 'load_reference_checkpoint', 'log_prob',
           'loss', 'sample']
