"""umd-jax entry point (the `umd-jax` command that `pip install -e .` installs is the same): pick a config and a mode.

  python main.py --config=configs/umd_b.py --mode=pretrain --workdir=/path/to/workdir
  python main.py --config=configs/umd_b.py --mode=probe --workdir=/path/to/workdir
  python main.py --config=configs/umd_b.py --mode=summary --workdir=/tmp/summary
  python main.py --config=configs/latent_umd_l.py --mode=encode --workdir=/path/to/latents \
      --config.vae.weights=vae.npz --config.data.data_dir=/path/to/tensorflow_datasets

Every host of a TPU pod runs the same command. Config values can be overridden on the
command line (`--config.batch_size=256`); an unknown key is an error.
"""
from umd_jax import hugepages

if __name__ == "__main__":
  hugepages.ensure()  # before JAX starts: XLA:CPU's step buffers in huge pages (umd_jax/hugepages.py)

from umd_jax import cli  # noqa: E402

if __name__ == "__main__":
  cli.run()
