"""The learned KV autoencoder (seeds 000/001): the method (`method`) and its training (`training`, run by
`kvbench train autoencoder`)."""

from kvbench.methods.autoencoder.method import Autoencoder, AutoencoderConfig

__all__ = ["Autoencoder", "AutoencoderConfig"]
