#!/usr/bin/env python
"""Reference for SDXL ControlNet training: one step of diffusers'
`examples/controlnet/train_controlnet_sdxl.py` on the tiny fixtures: tiny-sdxl's
U-Net frozen, tiny-controlnet-sdxl trained, both given the same prompt embeddings
and `added_cond_kwargs` (`text_embeds`, `time_ids`).

    python scripts/make_controlnet_sdxl_training_reference.py
    # writes tests/fixtures/reference/training_controlnet_sdxl.safetensors

Needs torch, diffusers 0.42.1 and safetensors.

The step, as the SD 1.5 one (`make_controlnet_training_reference.py`): DDPM
`add_noise` at fixed timesteps, the ControlNet's residuals of the noisy latents and
the control images (in [0, 1]) into the frozen U-Net, epsilon MSE loss, gradients
clipped to half their measured norm, AdamW (lr 1e-3, betas 0.9/0.999, weight decay
1e-2, eps 1e-8). The time ids are two pictures' (original size, crop corner, target
size), as the script's `compute_time_ids` makes them. In this tiny ControlNet the
time and added embeddings barely reach the outputs (their gradients are ~1e-10, f32
noise), so for those keys the check is of the AdamW update only (within 1e-4); the
other keys' gradients are of order 1e-4 to 1e-2.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
model_dir = os.path.join(root, "tiny-sdxl")

unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
unet.requires_grad_(False)
controlnet = ControlNetModel.from_pretrained(os.path.join(root, "tiny-controlnet-sdxl"))
controlnet.train()
scheduler = DDPMScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))

g = torch.Generator().manual_seed(22)
latents = torch.randn(2, 4, 16, 16, generator=g)
noise = torch.randn(2, 4, 16, 16, generator=g)
context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
text_embeds = torch.randn(2, text_dim, generator=g)
time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0], [160.0, 96.0, 16.0, 0.0, 128.0, 128.0]])
timesteps = torch.tensor([123, 777], dtype=torch.long)
cond = torch.stack([
    torch.from_numpy(np.asarray(Image.open(os.path.join(root, "reference", "controlnet_sdxl", f"control_{k}.png"))
                                .convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    for k in ("edge", "depth")
])

KEYS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "add_embedding.linear_1.weight",
    "add_embedding.linear_2.bias",
    "controlnet_cond_embedding.conv_in.weight",
    "controlnet_cond_embedding.conv_out.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "mid_block.resnets.1.norm2.weight",
    "controlnet_down_blocks.0.weight",
    "controlnet_down_blocks.5.bias",
    "controlnet_mid_block.weight",
]

params = dict(controlnet.named_parameters())
optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
added = {"text_embeds": text_embeds, "time_ids": time_ids}
noisy = scheduler.add_noise(latents, noise, timesteps)
down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added,
                       controlnet_cond=cond, return_dict=False)
pred = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
optimizer.zero_grad()
loss.backward()
assert all(p.grad is None for p in unet.parameters()), "the U-Net is frozen"
out = {"latents": latents, "noise": noise, "context": context, "text_embeds": text_embeds, "time_ids": time_ids,
       "timesteps": timesteps, "controlnet_cond": cond, "loss": loss.detach().reshape(1)}
for k in KEYS:
    out[f"grad.{k}"] = params[k].grad.detach().clone()
total = torch.nn.utils.clip_grad_norm_(controlnet.parameters(), float("inf"))
out["grad_norm"] = total.detach().reshape(1)
torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 0.5 * total.item())
optimizer.step()
for k in KEYS:
    out[f"param.{k}"] = params[k].detach().clone()
save_file({k: v.contiguous() for k, v in out.items()},
          os.path.join(root, "reference", "training_controlnet_sdxl.safetensors"))
print("SDXL ControlNet training reference: loss", loss.item(), "grad norm", total.item())
