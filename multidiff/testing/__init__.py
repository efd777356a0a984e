"""Analytic targets with exact denoisers and exact log-densities, for tests and benchmarks."""
from .gmm import GaussianMixture, IsotropicGaussian, MixtureDenoiser

__all__ = ["GaussianMixture", "IsotropicGaussian", "MixtureDenoiser"]
