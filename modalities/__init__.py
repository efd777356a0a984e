"""Modality adapters, installed as ``multidiff.modalities``."""
