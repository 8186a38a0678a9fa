"""Tolerances, in one table keyed by what is compared."""

TOL = {
    # same fp32 ops in a different arrangement (split vs unsplit, cached vs full)
    "fp32_split": 1e-4,
    # our module vs transformers, relative error on logits
    "fp32_vs_transformers_rel": 1e-4,
}
