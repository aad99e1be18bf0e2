"""The VL-SAE and the guard: the math (sae, paper), checkpoints, and ``guard()`` itself.

Nothing here knows a model family; :mod:`vlsae_guard.backends` says where a model's projector
and layers are.
"""
