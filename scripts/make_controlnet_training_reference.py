#!/usr/bin/env python
"""Reference for ControlNet training: one step of diffusers' ControlNet recipe
(`examples/controlnet/train_controlnet.py`) on the tiny fixtures: the U-Net frozen,
the ControlNet trained.

    python scripts/make_controlnet_training_reference.py
    # writes tests/fixtures/reference/training_controlnet.safetensors

Needs torch, diffusers 0.42.1 and safetensors.

The step: DDPM `add_noise` at fixed timesteps; the ControlNet's residuals of the
noisy latents and the control images (in [0, 1]) go into the frozen U-Net; epsilon
MSE loss; gradients clipped to a total norm of half the measured one (so clipping
acts); AdamW (lr 1e-3, betas 0.9/0.999, weight decay 1e-2, eps 1e-8). It starts from
tiny-controlnet (random, non-zero output convs), so every parameter gets a gradient
(a fresh `from_unet` ControlNet has zero output convs, and only they would).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
model_dir = os.path.join(root, "tiny-sd15")

unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
unet.requires_grad_(False)
controlnet = ControlNetModel.from_pretrained(os.path.join(root, "tiny-controlnet"))
controlnet.train()
scheduler = DDPMScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))

g = torch.Generator().manual_seed(21)
latents = torch.randn(2, 4, 16, 16, generator=g)
noise = torch.randn(2, 4, 16, 16, generator=g)
context = torch.randn(2, 77, 32, generator=g)
timesteps = torch.tensor([91, 640], dtype=torch.long)
cond = torch.stack([
    torch.from_numpy(np.asarray(Image.open(os.path.join(root, "reference", "controlnet", f"control_{k}.png"))
                                .convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    for k in ("edge", "depth")
])

KEYS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "controlnet_cond_embedding.conv_in.weight",
    "controlnet_cond_embedding.blocks.1.bias",
    "controlnet_cond_embedding.conv_out.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.1.resnets.0.conv1.weight",
    "mid_block.resnets.1.norm2.weight",
    "controlnet_down_blocks.0.weight",
    "controlnet_down_blocks.8.bias",
    "controlnet_mid_block.weight",
]

params = dict(controlnet.named_parameters())
optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
noisy = scheduler.add_noise(latents, noise, timesteps)
down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
pred = unet(noisy, timesteps, encoder_hidden_states=context, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False)[0]
loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
optimizer.zero_grad()
loss.backward()
assert all(p.grad is None for p in unet.parameters()), "the U-Net is frozen"
out = {"latents": latents, "noise": noise, "context": context, "timesteps": timesteps, "controlnet_cond": cond,
       "loss": loss.detach().reshape(1)}
for k in KEYS:
    out[f"grad.{k}"] = params[k].grad.detach().clone()
total = torch.nn.utils.clip_grad_norm_(controlnet.parameters(), float("inf"))
out["grad_norm"] = total.detach().reshape(1)
torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 0.5 * total.item())
optimizer.step()
for k in KEYS:
    out[f"param.{k}"] = params[k].detach().clone()
save_file({k: v.contiguous() for k, v in out.items()},
          os.path.join(root, "reference", "training_controlnet.safetensors"))
print("ControlNet training reference: loss", loss.item(), "grad norm", total.item())
