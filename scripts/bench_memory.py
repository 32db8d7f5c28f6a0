#!/usr/bin/env python
"""The planner's activation model (``alignrl plan``) against the memory a real training forward and backward takes.

Builds a published denoiser's real configuration with fewer blocks (random weights, so it fits anywhere: SD3.5
Medium's MMDiT at width 1536 with its first blocks dual-attention, FLUX.1-dev's at width 3072 with double and single
blocks in the real 1:2 ratio), runs one training forward and backward of ``B`` samples at ``--resolution`` with
``--text-len`` text tokens, and prints per configuration:

    planned     the planner's figure: ``c L B S d`` bytes without checkpointing, ``2 L B S d + c B S d`` with it
                (``c`` from ``alignrl.plan.TOKEN_COEFF`` for the layout, ``L`` blocks, ``S`` tokens per sample,
                ``d`` width), plus 2 bytes per parameter of autocast's weight copies for fp32 weights (one
                block's with checkpointing). The coefficients were fitted to this script's output on an H200.
    saved       the distinct non-parameter tensors autograd saves (the method the coefficients were fitted with)
    after fwd   CUDA memory allocated after the forward, above the weights (what the saved tensors really hold,
                autocast's weight casts included)
    peak        CUDA peak during forward and backward, above the weights and their gradients (backward's
                transients on top)

in three weight layouts: ``bf16`` (weights in bf16, no autocast: the coefficients' own setting), ``bf16+autocast``
(a bf16 LoRA base, or FSDP's gathered bf16 units, with trainer.mixed_precision=bf16: autocast runs norms and
softmax in fp32) and ``fp32+autocast`` (alignrl's full fine-tune without sharding: fp32 master weights, compute
under bf16 autocast, which keeps a bf16 copy of every weight it casts until backward has used it). CUDA only for the memory columns (``saved`` runs
anywhere).

    python scripts/bench_memory.py [--family sd3 flux] [--blocks 6] [--batch 1 2] [--resolution 512]
                                   [--text-len 128] [--device cuda] [--cudnn-attention]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

# The published configurations (diffusers' transformer config.json of each model), blocks reduced below.
SD35_MEDIUM = dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                   num_attention_heads=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                   pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)  # 24 layers, 0-12 dual attention
FLUX1_DEV = dict(attention_head_dim=128, axes_dims_rope=(16, 56, 56), guidance_embeds=True, in_channels=64,
                 joint_attention_dim=4096, num_attention_heads=24, patch_size=1,
                 pooled_projection_dim=768)  # 19 double blocks, 38 single


def build(family: str, blocks: int, device, dtype):
    """The reduced denoiser and its plan figures: (module, blocks L, width d, extra text tokens)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device(device):
        if family == "sd3":  # dual attention in the first 13 of 24 blocks: the same share here
            dual = tuple(range(max(1, round(blocks * 13 / 24))))
            model = SD3Transformer2DModel(num_layers=blocks, dual_attention_layers=dual, **SD35_MEDIUM)
            return model.to(dtype), blocks, 1536, 77  # CLIP's 77 tokens join T5's in SD3's joint sequence
        double = max(1, round(blocks / 3))
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=blocks - double, **FLUX1_DEV)
        return model.to(dtype), blocks, 3072, 0


def inputs(family: str, batch: int, resolution: int, text_len: int, device):
    side = resolution // 8  # latent side (VAE factor 8)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    t = torch.full((batch,), 500.0 if family == "sd3" else 0.5, device=device)
    if family == "sd3":
        return dict(hidden_states=rnd(batch, 16, side, side), encoder_hidden_states=rnd(batch, text_len + 77, 4096),
                    pooled_projections=rnd(batch, 2048), timestep=t, return_dict=False)
    tokens = (side // 2) ** 2  # 2x2 latent patches packed into 64 channels
    ids = torch.zeros(side // 2, side // 2, 3)
    ids[..., 1] = torch.arange(side // 2)[:, None]
    ids[..., 2] = torch.arange(side // 2)[None, :]
    return dict(hidden_states=rnd(batch, tokens, 64), encoder_hidden_states=rnd(batch, text_len, 4096),
                pooled_projections=rnd(batch, 768), timestep=t, guidance=torch.full((batch,), 3.5, device=device),
                img_ids=ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text_len, 3, device=device),
                return_dict=False)


def measure(model, kw: dict, autocast: bool, checkpointing: bool, device) -> dict:
    """One training forward and backward: the saved tensors' bytes, and on CUDA the allocated bytes after the
    forward and the peak, each above the weights (the peak above the weights and their gradients too)."""
    from alignrl.plan import SavedTensorBytes

    cuda = device.type == "cuda"
    saved = SavedTensorBytes(model)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    for p in model.parameters():
        p.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp, saved:
        out = model(**kw)[0]
        loss = out.float().pow(2).mean()
    after = (torch.cuda.memory_allocated() - base) if cuda else float("nan")
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base - grads) if cuda else float("nan")
    del out, loss
    for p in model.parameters():
        p.grad = None
    if checkpointing:
        model.disable_gradient_checkpointing()
    return dict(saved=saved.total, after=float(after), peak=float(peak))


def main():
    from alignrl.plan import TOKEN_COEFF

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    p.add_argument("--blocks", type=int, default=6, help="transformer blocks (the planner's L; FLUX's 1:2 at 6)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--text-len", type=int, default=128, help="T5 tokens (SD3 adds CLIP's 77)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cudnn-attention", action="store_true",
                   help="allow cuDNN's fused attention (alignrl's default, trainer.cudnn_attention=false, does not)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{name}, torch {torch.__version__}; one training forward + backward, {args.resolution} px, "
          f"T5 {args.text_len} tokens, {args.blocks} blocks; GiB; ratio = measured / planned")
    gib = 2.0**30
    for family in args.family:
        for layout, dtype, autocast in (("bf16", torch.bfloat16, False), ("bf16+autocast", torch.bfloat16, True),
                                        ("fp32+autocast", torch.float32, True)):
            model, L, d, extra = build(family, args.blocks, device, dtype)
            model.requires_grad_(True)
            n = sum(p.numel() for p in model.parameters())
            kind = {"bf16": "plain", "bf16+autocast": "autocast", "fp32+autocast": "fp32"}[layout]
            c = TOKEN_COEFF[family][kind]  # the planner's coefficient for this forward
            for batch in args.batch:
                kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
                      for k, v in inputs(family, batch, args.resolution, args.text_len, device).items()}
                S = (args.resolution // 16) ** 2 + args.text_len + extra
                for ckpt in (False, True):
                    planned = (2 * L * batch * S * d + c * batch * S * d) if ckpt else c * L * batch * S * d
                    if kind == "fp32":  # and its row of autocast's 16-bit weight copies (one block's with ckpt)
                        planned += 2 * n / (L if ckpt else 1)
                    m = measure(model, kw, autocast, ckpt, device)
                    casts = f"; weight casts {2 * n / gib:.2f}" if dtype == torch.float32 else ""
                    print(f"  {family:<4} {layout:<13} {n / 1e6:7.1f}M params  B={batch} S={S:<5} "
                          f"{'ckpt ' if ckpt else 'plain'}  planned {planned / gib:6.2f}  saved {m['saved'] / gib:6.2f} "
                          f"({m['saved'] / planned:4.2f})  after fwd {m['after'] / gib:6.2f} "
                          f"({m['after'] / planned:4.2f})  peak {m['peak'] / gib:6.2f} ({m['peak'] / planned:4.2f})"
                          f"{casts}", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
