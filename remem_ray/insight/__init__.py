"""What a sweep teaches: teacher diagnostics and the sweep report.

information   mutual information of a teacher's outputs (the information-plane estimates)
expertness    how class-specific each ViT MLP block's neurons are (spectral co-clustering)
checkpoint    `remem info`: both, for one saved checkpoint on a spec's validation data
report        a sweep's report.md and plots

Import the modules themselves: this package imports nothing, so that reading a sweep's
report does not pull in torch.
"""
