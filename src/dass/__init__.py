"""dass: one-shot pruning of GLU language models.

The public verbs are :func:`prune` (walk a loaded transformers model layer by layer and
sparsify it with DaSS, Wanda, SparseGPT or magnitude) and the helpers in the submodules.
"""

__version__ = "0.1.0"
