"""Offline tokenizers and tiny random-init model configs for tests and the CPU default.

The tiny models use the same classes as the real checkpoints (CLIP, T5, SD3/FLUX transformers,
AutoencoderKL), so every code path the real models take is exercised; only sizes differ. Weights are
random but seeded, so a tiny backbone is identical across processes and runs.
"""

from __future__ import annotations

import string
from typing import Sequence

# Words that get a single token each in the tiny T5 vocabulary (everything else falls back to
# characters). Keeps T5 sequences short for the prompts used in tests and tiny recipes.
COMMON_WORDS = (
    "a an the of on in with and at to by photo picture image painting drawing sign that says "
    "red green blue yellow orange purple pink black white brown gray "
    "cat dog bird horse car apple banana flower tree house boat clock chair cup book "
    "big small one two three four left right above below next sunset mountain city beach forest "
    "circle square triangle shape shapes"
).split()

_CHARS = string.ascii_lowercase + string.digits + ".,!?'\"-:;()/&"


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A character-level CLIP BPE tokenizer built in memory (no merges, no download)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = model_max_length
    return tok


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A unigram T5 tokenizer built in memory: common words are one token, the rest characters."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [(c, -8.0) for c in _CHARS]
    vocab += [("\u2581" + c, -8.0) for c in _CHARS]
    vocab += [("\u2581" + w, -2.0) for w in COMMON_WORDS]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = model_max_length
    return tok


def tiny_clip_config(projection: bool, hidden: int = 32, layers: int = 2, max_positions: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=2 + 2 * len(_CHARS), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=max_positions,
        projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu",
    )


def tiny_t5_config(d_model: int = 32, layers: int = 2):
    from transformers import T5Config

    return T5Config(
        vocab_size=4 + 2 * len(_CHARS) + len(COMMON_WORDS), d_model=d_model, d_kv=8, d_ff=2 * d_model,
        num_layers=layers, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )


def tiny_vae(latent_channels: int = 4, scale_factor: int = 8, channels: int | Sequence[int] = 16):
    """A small AutoencoderKL with ``log2(scale_factor)`` down/up stages.

    ``channels``: one width for every stage, or one per stage from the highest resolution down
    (the decoder runs them in reverse).
    """
    from diffusers import AutoencoderKL

    stages = {1: 1, 2: 2, 4: 3, 8: 4}[scale_factor]
    widths = (int(channels),) * stages if isinstance(channels, int) else tuple(int(c) for c in channels)
    if len(widths) != stages:
        raise ValueError(f"vae channels {list(widths)} must list {stages} stages for scale factor {scale_factor}")
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages,
        block_out_channels=widths, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=min(min(widths), 8),
        sample_size=64, scaling_factor=1.5305, shift_factor=0.0609, mid_block_add_attention=False,
    )
