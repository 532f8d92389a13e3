"""What the network sees, in numbers every method and mode shares: the input's size and channels
(pixels, or SD-VAE latents) and its token count for a patch size."""


def input_shape(config) -> tuple:
  """(size, channels) of what the model sees: the images of `config.data`, or with
  data.space="latents" their VAE latents (size / vae.downsample, vae.latent_channels)."""
  d = config.data
  if d.space == "latents":
    return d.image_size // config.vae.downsample, config.vae.latent_channels
  return d.image_size, d.channels


def num_tokens(config, patch: int) -> int:
  """Patches of one input cut into patch × patch squares: (input size / patch)²."""
  return (input_shape(config)[0] // patch) ** 2
