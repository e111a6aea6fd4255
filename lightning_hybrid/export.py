"""Writing the actor out as a Hugging Face directory that plain transformers / peft load.

The weights are gathered from ZeRO-3 once, copied to CPU on rank 0, and loaded into a
fresh model built from the actor's config, so nothing of DeepSpeed's partitioning leaks
into the files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .lora import is_dschat_lora


def _fresh_like(module: nn.Module) -> nn.Module:
    return AutoModelForCausalLM.from_config(module.config, dtype=next(module.parameters()).dtype)


def write_hf_directory(module: nn.Module, state: dict[str, torch.Tensor], directory: Path, merge_lora: bool) -> None:
    """Save ``module`` (whose whole weights are ``state``) to ``directory``.

    PEFT actors: merged (``merge_lora=True``), or the base model in ``directory`` plus the
    adapter in ``directory/adapter``. DeepSpeed-Chat LoRA actors: merged only.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "peft_config"):
        from peft import get_peft_model

        adapter = module.active_adapter
        copy = get_peft_model(_fresh_like(module.get_base_model()), module.peft_config[adapter])
        # Only the active adapter travels, renamed to the fresh copy's "default".
        ours = {k: v for k, v in state.items() if "lora_" not in k or f".{adapter}." in k}
        copy.load_state_dict({k.replace(f".{adapter}.", ".default."): v for k, v in ours.items()})
        if merge_lora:
            copy.merge_and_unload().save_pretrained(directory)
        else:
            copy.save_pretrained(directory / "adapter")
            copy.unload().save_pretrained(directory)
        return

    dschat = {name: m for name, m in module.named_modules() if is_dschat_lora(m)}
    if dschat and not merge_lora:
        raise ValueError("DeepSpeed-Chat LoRA has no adapter format that transformers loads: use merge_lora=True.")
    state = dict(state)
    for name, layer in dschat.items():
        left, right = state.pop(f"{name}.lora_left_weight"), state.pop(f"{name}.lora_right_weight")
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = (weight + layer.lora_scaling * (left.t() @ right.t())).to(weight.dtype)
    copy = _fresh_like(module)
    copy.load_state_dict(state)
    copy.save_pretrained(directory)
