#!/usr/bin/env python
"""Reward throughput: images/s in-process vs through `alignrl serve-reward` on loopback, in one run.

Each built-in reward that runs on this machine scores the same images (smooth random pictures at
--size) in-process and through a server on 127.0.0.1 (the server runs in a thread of this process and
scores with the same reward object, so the difference is the protocol: encoding, HTTP, decoding),
with PNG and with safetensors payloads. The CLIP rewards use random-init CLIP models of the chosen
architecture with an offline tokenizer (no weights can be downloaded here); throughput depends on the
architecture, not on the weights. Writes a table into docs/benchmarks.md (between the bench_rewards
markers) unless --no-doc.

    python scripts/bench_rewards.py                         # CPU, 512px images, CLIP ViT-B/16-sized models
    python scripts/bench_rewards.py --clip large --device cuda --images 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- bench_rewards:begin -->", "<!-- bench_rewards:end -->"
# (vision hidden, layers, heads, patch, text hidden, layers, heads, projection)
CLIP_SIZES = {"tiny": (64, 2, 2, 16, 64, 2, 2, 64), "base": (768, 12, 12, 16, 512, 12, 8, 512),
              "large": (1024, 24, 16, 14, 768, 12, 12, 768)}


def random_clip(size: str, folder: Path) -> Path:
    """A random-init CLIPModel of a real architecture + CLIP processor with an offline tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    from alignrl.backbones.tiny import tiny_clip_tokenizer

    vh, vl, va, patch, th, tl, ta, proj = CLIP_SIZES[size]
    tok = tiny_clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=th, intermediate_size=4 * th, num_hidden_layers=tl,
                          num_attention_heads=ta, max_position_embeddings=77, projection_dim=proj,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl, num_attention_heads=va,
                              image_size=224, patch_size=patch, projection_dim=proj)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=proj)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(folder)
    return folder


def aesthetic_head(dim: int, path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {}
    for idx, fan_in, fan_out in [(0, dim, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]:
        state[f"layers.{idx}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
        state[f"layers.{idx}.bias"] = torch.zeros(fan_out)
    save_file(state, str(path))
    return path


def images_and_prompts(n: int, size: int):
    """Smooth random images (PNG sizes like real pictures, not like noise) with ShapeWorld prompts."""
    import torch
    import torch.nn.functional as F

    from alignrl.shapes import world

    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(n, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bicubic",
                           align_corners=False).clamp(0, 1)
    metas = world.prompt_split("eval", per_tag=max(1, n // 6 + 1))
    metas = (metas * (n // len(metas) + 1))[:n]
    prompts = [m["prompt"] if isinstance(m, dict) else m.prompt for m in metas]
    metadata = [m if isinstance(m, dict) else dict(m.__dict__) for m in metas]
    return images, prompts, metadata


def throughput(reward, images, prompts, metadata, batch: int, repeats: int) -> float:
    reward(images[:batch], prompts[:batch], metadata[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            reward(images[i:i + batch], prompts[i:i + batch], metadata[i:i + batch])
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting; the fastest counts")
    p.add_argument("--clip", choices=sorted(CLIP_SIZES), default="base")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rewards", nargs="+",
                   default=["jpeg_compressibility", "shapes_geneval", "ocr", "clipscore", "pickscore", "aesthetic"])
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args()
    import torch

    from alignrl.eval.report import markdown_table, write_doc_section
    from alignrl.rewards.base import build_reward
    from alignrl.rewards.remote import RemoteReward
    from alignrl.rewards.server import serve_in_background

    tmp = Path(tempfile.mkdtemp(prefix="bench_rewards_"))
    clip_dir = None
    images, prompts, metadata = images_and_prompts(args.images, args.size)
    ocr_prompts = [f'a sign that says "HELLO {i}"' for i in range(args.images)]
    rows = []
    for name in args.rewards:
        options = {}
        if name in ("clipscore", "pickscore", "aesthetic"):
            clip_dir = clip_dir or random_clip(args.clip, tmp / f"clip_{args.clip}")
            options = {"model": str(clip_dir), "processor": str(clip_dir), "device": args.device,
                       "batch_size": args.batch}
            if name == "aesthetic":
                options["head"] = str(aesthetic_head(CLIP_SIZES[args.clip][7], tmp / "head.safetensors"))
        t0 = time.time()
        reward = build_reward(name, **options)
        texts = ocr_prompts if name == "ocr" else prompts
        local = throughput(reward, images, texts, metadata, args.batch, args.repeats)
        row = {"reward": name, "in-process img/s": round(local, 2)}
        with serve_in_background(reward, max_batch=max(64, args.batch), max_request_mb=256) as url:
            for fmt in ("png", "safetensors"):
                client = RemoteReward(url=url, format=fmt, timeout=600)
                remote = throughput(client, images, texts, metadata, args.batch, args.repeats)
                row[f"server {fmt} img/s"] = round(remote, 2)
                row[f"{fmt} / in-process"] = round(remote / local, 3)
        rows.append(row)
        print(f"[bench_rewards] {name}: {time.time() - t0:.1f} s {row}", flush=True)
    cols = list(rows[0].keys())
    device = f"CUDA {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    section = "\n".join([
        BEGIN, "",
        f"Measured {time.strftime('%Y-%m-%d')} on {device}: {args.images} images of {args.size}x{args.size} in "
        f"batches of {args.batch}, fastest of {args.repeats} passes after a warm-up; server on 127.0.0.1 in the "
        f"same process (one scoring thread); CLIP rewards on random-init CLIP '{args.clip}' "
        f"({'ViT-B/16' if args.clip == 'base' else 'ViT-L/14' if args.clip == 'large' else 'tiny'}-sized) models.",
        "", markdown_table(rows, cols), "", END])
    print(section)
    if not args.no_doc:
        write_doc_section(Path(args.doc), BEGIN, END,
                          "Rewards in-process and through the server (`scripts/bench_rewards.py`)", section)


if __name__ == "__main__":
    main()
