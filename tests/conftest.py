"""Test-wide settings: one intra-op thread per test process (pytest-xdist runs one process per
core; more threads only contend on a 2-core machine)."""
import torch

torch.set_num_threads(1)
