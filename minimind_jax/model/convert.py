"""The `convert` command and the Hugging Face exports: weights from any form `weights.load_weights`
reads (a LoRA run's or adapter file's adapters merged in with --merge_lora) to a reference-keyed
state dict, a Hugging Face Llama folder (MiniMind2) or a Qwen3 folder (minimind-3).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.model import lora
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.flags import HelpFormatter, add_model_args, model_config_from_args
from minimind_jax.model.weights import (
    MINIMIND3_KEYS,
    load_weights,
    save_state_dict,
    state_dict_from_params,
)


def _rope_to_rotate_half(w_out_in: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Reorder each head's rows (2i, 2i+1) pairs -> (i, i + hd/2): interleaved -> HF layout."""
    order = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    w = w_out_in.reshape(n_heads, head_dim, -1)[:, order, :]
    return w.reshape(n_heads * head_dim, -1)


def export_hf_llama(params, config: ModelConfig, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write a Hugging Face `LlamaForCausalLM` folder (config.json + model.safetensors)."""
    if config.use_moe:
        raise UserError("Hugging Face Llama export supports the dense model only (not --use_moe)")
    from safetensors.numpy import save_file

    sd = state_dict_from_params(params, config)
    hd = config.head_dim
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
          "model.norm.weight": sd["norm.weight"]}
    for i in range(config.n_layers):
        ref, out = f"layers.{i}", f"model.layers.{i}"
        hf[f"{out}.self_attn.q_proj.weight"] = _rope_to_rotate_half(
            sd[f"{ref}.attention.wq.weight"], config.n_heads, hd)
        hf[f"{out}.self_attn.k_proj.weight"] = _rope_to_rotate_half(
            sd[f"{ref}.attention.wk.weight"], config.n_kv_heads, hd)
        hf[f"{out}.self_attn.v_proj.weight"] = sd[f"{ref}.attention.wv.weight"]
        hf[f"{out}.self_attn.o_proj.weight"] = sd[f"{ref}.attention.wo.weight"]
        hf[f"{out}.mlp.gate_proj.weight"] = sd[f"{ref}.feed_forward.w1.weight"]
        hf[f"{out}.mlp.up_proj.weight"] = sd[f"{ref}.feed_forward.w3.weight"]
        hf[f"{out}.mlp.down_proj.weight"] = sd[f"{ref}.feed_forward.w2.weight"]
        hf[f"{out}.input_layernorm.weight"] = sd[f"{ref}.attention_norm.weight"]
        hf[f"{out}.post_attention_layernorm.weight"] = sd[f"{ref}.ffn_norm.weight"]
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in hf.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": hd,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": max(config.max_seq_len, 32768),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


def export_hf_qwen3(params, config: ModelConfig, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write a Hugging Face `Qwen3ForCausalLM` (dense) or `Qwen3MoeForCausalLM` (MoE) folder
    for a minimind-3 config. Its numerics are minimind-3's exactly: q/k RMSNorm over head_dim
    before rotate-half RoPE, no biases, tied embeddings, one eps; minimind-3's state-dict names are
    already Qwen3's (the MoE experts in the per-expert layout transformers converts on load).
    Training-only differences: minimind-3's aux loss and its renormalisation epsilon (1e-20)."""
    if not config.qk_norm or config.rope_layout != "rotate_half" or config.n_shared_experts:
        raise UserError("the Qwen3 export is for minimind-3 models (--arch minimind3)")
    from safetensors.numpy import save_file

    sd = state_dict_from_params(params, config)
    del sd[MINIMIND3_KEYS.head]  # tied: transformers re-ties lm_head to the embedding
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["Qwen3MoeForCausalLM" if config.use_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if config.use_moe else "qwen3",
        "hidden_size": config.dim, "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": 32768, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "use_sliding_window": False, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }
    if config.use_moe:
        hf_config.update(num_experts=config.n_routed_experts,
                         num_experts_per_tok=config.num_experts_per_tok,
                         moe_intermediate_size=config.hidden_dim,
                         norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1,
                         mlp_only_layers=[], router_aux_loss_coef=config.aux_loss_alpha)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


def _run(args: argparse.Namespace) -> int:
    output = pathlib.Path(args.output)
    if args.hf_llama and output.exists() and not output.is_dir():
        raise UserError(f"--hf_llama writes a folder, but {output} is a file; name a folder")
    if not args.hf_llama and output.is_dir():
        raise UserError(f"{output} is a folder; name a .pth, .safetensors or .npz file "
                        "(or pass --hf_llama to write a Hugging Face folder)")
    params, config, _ = load_weights(args.input, model_config_from_args(args))
    print(f"loaded {args.input}: dim={config.dim} n_layers={config.n_layers} "
          f"n_heads={config.n_heads} n_kv_heads={config.n_kv_heads} "
          f"vocab={config.vocab_size} moe={config.use_moe}")
    if args.merge_lora or config.lora_rank:  # a LoRA run's adapters are merged too
        params, config = lora.merge_for_export(params, config, args.merge_lora)
        print("merged the LoRA adapters of "
              + (args.merge_lora or args.input) + " into the weights")
    if args.hf_llama:
        out = export_hf_llama(params, config, args.output)
        print(f"wrote Hugging Face Llama folder {out}")
    elif args.hf_qwen3:
        out = export_hf_qwen3(params, config, args.output)
        print(f"wrote Hugging Face Qwen3{'Moe' if config.use_moe else ''} folder {out}")
    else:
        save_state_dict(state_dict_from_params(params, config), args.output)
        print(f"wrote reference-keyed state dict {args.output}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", formatter_class=HelpFormatter,
        help="convert weights: reference .pth/.safetensors/.npz <-> our checkpoints, HF Llama, "
             "merged LoRA",
        description="Convert weights. INPUT is a reference-keyed state dict (.pth needs torch, "
                    ".safetensors, .npz; MiniMind2's or minimind-3's HF-style names, e.g. "
                    "minimind-3's float16 pretrain_768.pth or its *_resume.pth) or one of our "
                    "checkpoint/run folders. OUTPUT is a state dict in the model family's names "
                    "(format from its extension) or, with --hf_llama, a Hugging Face "
                    "LlamaForCausalLM folder (MiniMind2 dense; RoPE rows permuted to HF's "
                    "layout), or with --hf_qwen3 a Qwen3(Moe)ForCausalLM folder (minimind-3). "
                    "Shapes are inferred from the weights; for MiniMind2 names --n_heads must "
                    "match the model (default 8), minimind-3's give it.")
    p.add_argument("input", help="state-dict file or checkpoint/run folder to read")
    p.add_argument("output", help="file (.pth/.safetensors/.npz) or folder (--hf_*)")
    p.add_argument("--hf_llama", action="store_true",
                   help="write a Hugging Face Llama folder instead of a state dict (MiniMind2)")
    p.add_argument("--merge_lora", default=None, metavar="ADAPTER",
                   help="fold this LoRA adapter (.pth/.safetensors/.npz in the reference's key "
                        "names, e.g. our lora run's lora_*.pth) into INPUT's weights first: "
                        "W + B A per adapted projection (minimind-3: added in float16, as its "
                        "merge_lora). A lora run folder as INPUT is merged without it")
    p.add_argument("--hf_qwen3", action="store_true",
                   help="write a Hugging Face Qwen3ForCausalLM / Qwen3MoeForCausalLM folder "
                        "(minimind-3, whose numerics and weight names are Qwen3's)")
    add_model_args(p)
    p.set_defaults(func=_run)
