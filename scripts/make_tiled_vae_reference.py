#!/usr/bin/env python
"""Reference for tiled VAE decode/encode: diffusers' AutoencoderKL with
`enable_tiling()` on the tiny fixture VAE (sample_size 32, so 16-latent tiles).

    python scripts/make_tiled_vae_reference.py   # writes tests/fixtures/reference/vae_tiled.safetensors

Needs torch, diffusers 0.42.1 and safetensors (see ../shared/bench/README.md).
"""
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
vae = AutoencoderKL.from_pretrained(os.path.join(root, "tiny-sd15", "vae")).eval()
vae.enable_tiling()
g = torch.Generator().manual_seed(7)
latents = torch.randn(1, 4, 40, 24, generator=g)  # 80x48 pixels: 3x2 tiles of 16 latents
image = torch.rand(1, 3, 88, 56, generator=g) * 2 - 1  # 3x2 tiles of 32 pixels
with torch.no_grad():
    decoded = vae.decode(latents).sample
    moments = vae.encode(image).latent_dist.parameters
save_file(
    {"latents": latents.contiguous(), "decoded": decoded.contiguous(),
     "image": image.contiguous(), "moments": moments.contiguous()},
    os.path.join(root, "reference", "vae_tiled.safetensors"),
)
print("decoded", tuple(decoded.shape), "moments", tuple(moments.shape))
