"""What a teacher has learnt, as maths on its outputs and activations.

information   mutual information of a teacher's outputs (the information-plane estimates)
expertness    how class-specific each ViT MLP block's neurons are (spectral co-clustering)

A leaf: nothing here imports training, sweeps, data or checkpoints (expertness borrows only the
model helpers that find a ViT's MLP blocks), so any of those may use it. `remem info`
(remem_ray/info.py) applies both to a saved checkpoint; the sweep report
(remem_ray/sweep/report.py) plots the MI the trials recorded.

Import the modules themselves: this package's __init__ imports nothing.
"""
