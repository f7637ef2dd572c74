"""Checkpoints of other frameworks in and out: Hugging Face GPT-2 folders (load and save) and
nanoGPT state dicts (load). Reading ``model.safetensors`` needs only ``safetensors``; torch is
imported only for ``pytorch_model.bin`` and nanoGPT's ``ckpt.pt`` (``pip install
manual-grad[interop]``).

    from manual_grad.interop import load_gpt2, save_gpt2
    params, cfg = load_gpt2("path/to/gpt2")      # config.json + model.safetensors
    save_gpt2(params, cfg, "path/to/out")        # GPT2LMHeadModel.from_pretrained("path/to/out")
"""
from manual_grad.interop.hf import (config_from_hf, config_to_hf, gpt2_from_state_dict,
                                    gpt2_to_state_dict, load_gpt2, save_gpt2)
from manual_grad.interop.nanogpt import (config_from_model_args, load_nanogpt_checkpoint,
                                         load_nanogpt_state_dict)

__all__ = ["load_gpt2", "save_gpt2", "gpt2_from_state_dict", "gpt2_to_state_dict",
           "config_from_hf", "config_to_hf", "load_nanogpt_state_dict", "load_nanogpt_checkpoint",
           "config_from_model_args"]
