"""Analytic targets with exact denoisers and exact log-densities, for tests and benchmarks."""
from .distances import energy_distance, sliced_wasserstein
from .gmm import GaussianMixture, IsotropicGaussian, MixtureDenoiser

__all__ = ["GaussianMixture", "IsotropicGaussian", "MixtureDenoiser", "sliced_wasserstein", "energy_distance"]
