"""Build a stage (a layer range of the reference module) from a cached checkpoint."""

from __future__ import annotations

import torch

from splitlm.errors import ModelLoadError
from splitlm.model.checkpoint import Checkpoint
from splitlm.model.llama import Transformer


def build_stage(ckpt: Checkpoint, start: int = 0, stop: int | None = None, *, embed: bool | None = None,
                final: bool | None = None, dtype: torch.dtype = torch.float32) -> Transformer:
    """Layers [start, stop) of `ckpt`, reading only the tensors this stage owns."""
    from safetensors import safe_open

    stage = Transformer(ckpt.spec, start, stop, embed=embed, final=final)
    wanted = stage.state_dict_names()
    state = {}
    try:
        with safe_open(str(ckpt.weights_path), framework="pt") as f:
            available = set(f.keys())
            for name in wanted:
                source = name
                if name == "lm_head.weight" and name not in available and ckpt.spec.tie_word_embeddings:
                    source = "model.embed_tokens.weight"
                if source not in available:
                    raise ModelLoadError(f"{ckpt.weights_path} lacks tensor {source!r}")
                state[name] = f.get_tensor(source).to(dtype)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {ckpt.weights_path}: {exc}") from None
    for name, tensor in state.items():
        expected = stage.state_dict()[name].shape
        if tensor.shape != expected:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the spec says {tuple(expected)}")
    stage.load_state_dict(state, strict=True, assign=True)
    if stage.embeds and stage.finalizes and ckpt.spec.tie_word_embeddings:
        stage.lm_head.weight = stage.model.embed_tokens.weight
    return stage.to(dtype).eval()
