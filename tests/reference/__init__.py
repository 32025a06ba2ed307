"""PyTorch references the engine is checked against (test/dev helpers only; they import torch).

``family``: the DiNAT paper's other classifiers (DiNAT_s, isotropic NAT / DiNAT, ViT-rpb), written from
the papers and the fixture README, with SHI-Labs' ``state_dict`` names so that original checkpoints load.
"""
