#!/usr/bin/env python
"""Reference for training: two steps of diffusers' text-to-image training recipe
(`examples/text_to_image/train_text_to_image.py`) on the tiny fixture U-Net, and a
LoRA made with PEFT as diffusers' LoRA scripts make it.

    python scripts/make_training_reference.py
    # writes tests/fixtures/reference/training.safetensors,
    #        tests/fixtures/reference/lora.safetensors (reference outputs),
    #        tests/fixtures/lora/tiny_unet_lora_diffusers.safetensors (diffusers layout),
    #        tests/fixtures/lora/tiny_unet_lora_kohya.safetensors (kohya layout)

Needs torch, diffusers 0.42.1, peft and safetensors.

Training steps: DDPM `add_noise` at fixed timesteps, epsilon MSE loss; then the same
batch with v-prediction and min-SNR weighting (gamma 5); gradients clipped to a total
norm of half the measured one (so clipping acts); AdamW (lr 1e-3, betas 0.9/0.999,
weight decay 1e-2, eps 1e-8); EMA (`EMAModel`, decay 0.9999, no warm-up).
"""
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
model_dir = os.path.join(root, "tiny-sd15")

torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
unet.train()
scheduler = DDPMScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))

g = torch.Generator().manual_seed(11)
latents = torch.randn(2, 4, 16, 16, generator=g)
noise = torch.randn(2, 4, 16, 16, generator=g)
context = torch.randn(2, 77, 32, generator=g)
timesteps = torch.tensor([37, 812], dtype=torch.long)

KEYS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.proj_in.weight",
    "mid_block.resnets.0.norm1.weight",
    "up_blocks.2.resnets.2.conv2.weight",
    "conv_out.bias",
]

params = dict(unet.named_parameters())
ema = EMAModel(unet.parameters(), decay=0.9999)
optimizer = torch.optim.AdamW(
    unet.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
)
out = {
    "latents": latents,
    "noise": noise,
    "context": context,
    "timesteps": timesteps,
}

for step, kind in enumerate(["epsilon", "v_prediction"]):
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, context).sample
    if kind == "epsilon":
        target = noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / (snr + 1)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, len(loss.shape)))) * weights
        loss = loss.mean()
        out["snr_weights"] = weights.float()
    optimizer.zero_grad()
    loss.backward()
    out[f"step{step}.loss"] = loss.detach().reshape(1)
    for k in KEYS:
        out[f"step{step}.grad.{k}"] = params[k].grad.detach().clone()
    total = torch.nn.utils.clip_grad_norm_(unet.parameters(), float("inf"))
    out[f"step{step}.grad_norm"] = total.detach().reshape(1)
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 0.5 * total.item())
    optimizer.step()
    ema.step(unet.parameters())
    for k in KEYS:
        out[f"step{step}.param.{k}"] = params[k].detach().clone()

shadow = dict(zip([n for n, _ in unet.named_parameters()], ema.shadow_params))
for k in KEYS:
    out[f"ema.{k}"] = shadow[k].detach().clone()

os.makedirs(os.path.join(root, "reference"), exist_ok=True)
save_file(
    {k: v.contiguous() for k, v in out.items()},
    os.path.join(root, "reference", "training.safetensors"),
)
print("training reference: losses", [out[f"step{i}.loss"].item() for i in range(2)])

# ---------------------------------------------------------------- LoRA
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402
from diffusers.utils import convert_unet_state_dict_to_peft  # noqa: E402,F401

unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
with torch.no_grad():
    base = unet(latents, timesteps, context).sample
unet.add_adapter(
    LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
)
g = torch.Generator().manual_seed(5)
with torch.no_grad():
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapted = unet(latents, timesteps, context).sample
peft_sd = get_peft_model_state_dict(unet)
lora_dir = os.path.join(root, "lora")
os.makedirs(lora_dir, exist_ok=True)
diffusers_sd = convert_state_dict_to_diffusers(peft_sd)
# diffusers' own writer: `unet.` prefixes, lora_A/lora_B, adapter metadata in the header.
StableDiffusionPipeline.save_lora_weights(
    lora_dir,
    unet_lora_layers=diffusers_sd,
    weight_name="tiny_unet_lora_diffusers.safetensors",
    unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8},
)
kohya_sd = convert_state_dict_to_kohya({"unet." + k: v for k, v in peft_sd.items()})
# The converter writes alpha = rank; this LoRA was made with alpha 8.
kohya_sd = {k: (torch.tensor(8.0) if k.endswith(".alpha") else v) for k, v in kohya_sd.items()}
save_file(
    {k: v.contiguous() for k, v in kohya_sd.items()},
    os.path.join(lora_dir, "tiny_unet_lora_kohya.safetensors"),
    metadata={"ss_network_dim": "4", "ss_network_alpha": "8"},
)
save_file(
    {"base": base.contiguous(), "adapted": adapted.contiguous()},
    os.path.join(root, "reference", "lora.safetensors"),
)
print("lora reference: max |adapted - base|", (adapted - base).abs().max().item())
print("kohya keys", sorted(kohya_sd)[:3])
from safetensors import safe_open  # noqa: E402
with safe_open(os.path.join(lora_dir, "tiny_unet_lora_diffusers.safetensors"), "pt") as f:
    print("diffusers keys", sorted(f.keys())[:3], f.metadata())
