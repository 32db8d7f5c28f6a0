"""Write a diffusers SD1.x pipeline as one original-layout (LDM) ``.safetensors`` file, the format model sites ship,
so the single-file loading path is tested offline with a tiny model.

The key layout of that format (``model.diffusion_model.*`` for the UNet, ``first_stage_model.*`` for the VAE,
``cond_stage_model.transformer.*`` for the CLIP text encoder) is written out here from the layout's rules: a UNet
down block of L resnets occupies ``input_blocks`` (L + 1) i + 1 .. (L + 1) i + L, its downsampler (L + 1)(i + 1);
an up block of L + 1 resnets ``output_blocks`` (L + 1) i + j, its upsampler after the last resnet's attention;
VAE decoder blocks are numbered from the lowest resolution up.
"""

from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def unet_key(key: str, layers: int, up_attn: list[bool]) -> str:
    """The LDM name of a diffusers UNet2DConditionModel parameter (SD1.x layout)."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for a, b in fixed.items():
        if key.startswith(a + "."):
            return b + key[len(a):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = (layers + 1) * i + j + 1
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(layers + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = (layers + 1) * i + j
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attn[i] else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}


def vae_key(key: str, blocks: int) -> str:
    """The LDM name of a diffusers AutoencoderKL parameter (no mid-block attention)."""
    def res(rest):
        head, _, tail = rest.partition(".")
        return f"{VAE_RESNET.get(head, head)}.{tail}"

    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{res(m[3])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{res(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{res(m[3])}"
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def sd15_single_file_state(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder in the original single-file layout."""
    unet = pipe.unet
    layers = int(unet.config.layers_per_block)
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    out = {f"model.diffusion_model.{unet_key(k, layers, up_attn)}": v for k, v in unet.state_dict().items()}
    blocks = len(pipe.vae.config.block_out_channels)
    out.update({f"first_stage_model.{vae_key(k, blocks)}": v for k, v in pipe.vae.state_dict().items()})
    # the format names the CLIP text model's weights text_model.* (newer transformers drop that level in memory)
    out.update({f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
                for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.contiguous() for k, v in out.items()}
