"""Tolerances, in one table keyed by what is compared."""

TOL = {
    # same fp32 ops in a different arrangement (split vs unsplit, cached vs full)
    "fp32_split": 1e-4,
    # our module vs transformers, relative error on logits
    "fp32_vs_transformers_rel": 1e-4,
    # Triton kernel vs its torch reference, max |diff| / max |reference|, keyed by op and input dtype
    "kernel_frame_decode": 1e-5,
    "kernel_wq_matmul_float32": 1e-5,
    "kernel_wq_matmul_float16": 2e-3,
    "kernel_wq_matmul_bfloat16": 1.6e-2,
}
