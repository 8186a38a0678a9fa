"""Tolerances, in one table keyed by what is compared.

The export's own parity contract (ONNX head vs torch head) is `splitlm.export.build.PARITY_TOL`, a runtime
check of `splitlm export --check`; tests that hold an export to it import that table instead of repeating it.
"""

TOL = {
    # same fp32 ops in a different arrangement (split vs unsplit, cached vs full)
    "fp32_split": 1e-4,
    # the same forward batched with other sessions, or in prefill chunks, vs alone in one call (atol and rtol)
    "fp32_batched": 1e-5,
    # perplexity of one model evaluated at two split points, relative
    "ppl_across_splits_rel": 1e-5,
    # our module vs transformers, relative error on logits
    "fp32_vs_transformers_rel": 1e-4,
    # logprobs sent as float32 on the wire vs log_softmax in float64
    "wire_logprob_abs": 1e-4,
    # the codec's relative error may pass its budget ε by float32 rounding: ε·(1 + rel) + abs
    "codec_budget_rel": 1e-4,
    "codec_budget_abs": 1e-9,
    # a per-row error that should not grow, up to float32 rounding
    "codec_error_abs": 1e-7,
    # round-to-nearest stays within half a quantization step, up to rounding: step/2·(1 + rel) + abs
    "half_step_rel": 1e-3,
    "weight_half_step_abs": 1e-7,
    "kv_half_step_abs": 1e-6,
    # a quantized KV cache's decode logits vs the fp32 cache's, relative L2, by KV bits (static per-channel
    # scales from the protocol text; the test feeds random byte ids the calibration never saw)
    "kv_decode_rel_8": 2e-2,
    "kv_decode_rel_4": 2e-1,
    # empirical token frequencies vs softmax probabilities (20000 draws)
    "sampling_frequency_abs": 0.015,
    # Triton kernel vs its torch reference, max |diff| / max |reference|, keyed by op and input dtype
    "kernel_frame_decode": 1e-5,
    "kernel_wq_matmul_float32": 1e-5,
    "kernel_wq_matmul_float16": 2e-3,
    "kernel_wq_matmul_bfloat16": 1.6e-2,
    # a bfloat16 tail's logits vs the float32 tail's on the same frames, relative L2 (bfloat16 keeps 8 bits of mantissa)
    "bf16_tail_logits_rel": 3e-2,
    # the weight-only matmul's reference vs x @ the quantizer's dequantized weight (atol and rtol)
    "wq_reference_vs_dequantized": 1e-5,
}
