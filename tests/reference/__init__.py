"""PyTorch references the engine is checked against (test/dev helpers only; they import torch).

``torch_natten``: NATTEN's 2-D (dilated) neighborhood attention in plain PyTorch, and ``patch_transformers``,
which runs transformers' DiNAT / NAT on it (also the PyTorch baseline of the benchmarks).

``family``: the DiNAT paper's other classifiers (DiNAT_s, isotropic NAT / DiNAT, ViT-rpb), written from
the papers and the fixture README, with SHI-Labs' ``state_dict`` names so that original checkpoints load.

``random_weights``: every parameter of a PyTorch model drawn at random, for the live parity tests.
"""
