#!/usr/bin/env python
"""References for ControlNet training: one step of diffusers' ControlNet recipes on
the tiny fixtures, the U-Net frozen and the ControlNet trained:

* SD 1.5 (`examples/controlnet/train_controlnet.py`): tiny-sd15 with tiny-controlnet,
  `tests/fixtures/reference/training_controlnet.safetensors`;
* SDXL (`train_controlnet_sdxl.py`): tiny-sdxl with tiny-controlnet-sdxl, both models
  given the same `added_cond_kwargs` (`text_embeds` and the time ids of two pictures,
  original size + crop corner + target size, as its `compute_time_ids` makes them),
  `tests/fixtures/reference/training_controlnet_sdxl.safetensors`.

    python scripts/make_controlnet_training_reference.py

Needs torch, diffusers 0.42.1 and safetensors.

The step: DDPM `add_noise` at fixed timesteps; the ControlNet's residuals of the
noisy latents and the control images (in [0, 1]) go into the frozen U-Net; epsilon
MSE loss; gradients clipped to a total norm of half the measured one (so clipping
acts); AdamW (lr 1e-3, betas 0.9/0.999, weight decay 1e-2, eps 1e-8). Both start
from random ControlNets with non-zero output convs, so every parameter gets a
gradient (a fresh `from_unet` ControlNet has zero output convs, and only they would).
In the tiny SDXL ControlNet the time and added embeddings barely reach the outputs
(their gradients are ~1e-10, f32 noise), so for those keys the check is of the AdamW
update only.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def control_images(folder):
    return torch.stack([
        torch.from_numpy(np.asarray(Image.open(os.path.join(root, "reference", folder, f"control_{k}.png"))
                                    .convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        for k in ("edge", "depth")
    ])


def step(model, controlnet_dir, control_folder, seed, timesteps, keys, out_name, sdxl=False):
    """One recorded training step; writes `reference/{out_name}`."""
    model_dir = os.path.join(root, model)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
    unet.requires_grad_(False)
    controlnet = ControlNetModel.from_pretrained(os.path.join(root, controlnet_dir))
    controlnet.train()
    scheduler = DDPMScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    out = {}
    added = None
    if sdxl:
        text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, text_dim, generator=g),
                 "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0],
                                           [160.0, 96.0, 16.0, 0.0, 128.0, 128.0]])}
        out.update(added)
    timesteps = torch.tensor(timesteps, dtype=torch.long)
    cond = control_images(control_folder)

    params = dict(controlnet.named_parameters())
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added,
                           controlnet_cond=cond, return_dict=False)
    pred = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added,
                down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in unet.parameters()), "the U-Net is frozen"
    out.update({"latents": latents, "noise": noise, "context": context, "timesteps": timesteps,
                "controlnet_cond": cond, "loss": loss.detach().reshape(1)})
    for k in keys:
        out[f"grad.{k}"] = params[k].grad.detach().clone()
    total = torch.nn.utils.clip_grad_norm_(controlnet.parameters(), float("inf"))
    out["grad_norm"] = total.detach().reshape(1)
    torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 0.5 * total.item())
    optimizer.step()
    for k in keys:
        out[f"param.{k}"] = params[k].detach().clone()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(root, "reference", out_name))
    print(f"{out_name}: loss {loss.item()}, grad norm {total.item()}")


SHARED_KEYS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "controlnet_cond_embedding.conv_in.weight",
    "controlnet_cond_embedding.conv_out.weight",
    "mid_block.resnets.1.norm2.weight",
    "controlnet_down_blocks.0.weight",
    "controlnet_mid_block.weight",
]
step("tiny-sd15", "tiny-controlnet", "controlnet", 21, [91, 640], SHARED_KEYS + [
    "controlnet_cond_embedding.blocks.1.bias",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.1.resnets.0.conv1.weight",
    "controlnet_down_blocks.8.bias",
], "training_controlnet.safetensors")
step("tiny-sdxl", "tiny-controlnet-sdxl", "controlnet_sdxl", 22, [123, 777], SHARED_KEYS + [
    "add_embedding.linear_1.weight",
    "add_embedding.linear_2.bias",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "controlnet_down_blocks.5.bias",
], "training_controlnet_sdxl.safetensors", sdxl=True)
