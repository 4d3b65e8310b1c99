"""samplerlab: a plugin-based research framework for the samplers of latent diffusion models.

Plugin authors import everything they need from :mod:`framework.plugin`; the layers of the package
are described in docs/architecture.md.
"""
__version__ = "0.1.0"
