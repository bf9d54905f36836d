"""Learned potentials: neighbour lists, the Potential interface, evaluation, training.

Submodules import torch; import them directly (``from sim_backend.nn.evaluate import
evaluate``). This package file stays empty of heavy imports.
"""
