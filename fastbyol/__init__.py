"""fastbyol: BYOL (Bootstrap Your Own Latent, Grill et al. 2020) pretraining, as fast as the hardware allows."""

__version__ = "0.1.0"
