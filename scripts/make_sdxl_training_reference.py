#!/usr/bin/env python
"""Reference for SDXL LoRA training: one step of diffusers' recipe
(`examples/text_to_image/train_text_to_image_lora_sdxl.py`) on the tiny SDXL.

    python scripts/make_sdxl_training_reference.py
    # writes tests/fixtures/training_sdxl/data/{tall.png, tall.txt} (the data folder),
    #        tests/fixtures/training_sdxl/initial_lora/pytorch_lora_weights.safetensors,
    #        tests/fixtures/reference/training_sdxl.safetensors, and with the text
    #        encoders trained too (`--train_text_encoder`, part 2 below):
    #        tests/fixtures/training_sdxl/initial_lora_te/pytorch_lora_weights.safetensors,
    #        tests/fixtures/reference/training_sdxl_te.safetensors

Needs torch, diffusers 0.42.1, peft and safetensors.

What the script does, step by step, as the recipe does it:
- the image (32 wide, 40 high, resolution 32, center crop): `original_size` (40, 32),
  no resize (its shorter side is the resolution), crop top-left
  `(round((40 - 32) / 2), 0)` = (4, 0); pixels `p / 127.5 - 1`;
- `encode_prompt`: both tokenizers (padded to 77), each encoder's `hidden_states[-2]`
  concatenated, the pooled embedding from text_encoder_2 (`text_embeds`);
- `add_time_ids` = original size + crop top-left + (resolution, resolution);
- the VAE's moments (`latent_dist.mean`, `.logvar`), latents = (mean + std * eps) *
  scaling_factor with a recorded eps, two rows (timesteps 100 and 700);
- LoRA as the recipe attaches it (`LoraConfig(r=4, lora_alpha=4,
  init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0])`), then the
  up factors (`lora_B`, zero at init) set to small random values so that the down
  factors get gradients too; that initial LoRA is saved with
  `StableDiffusionXLPipeline.save_lora_weights` (the recipe's own writer);
- the step: epsilon MSE, `clip_grad_norm_` at 1.0 (the recipe's default), AdamW (lr
  1e-3, betas 0.9 / 0.999, weight decay 1e-2, eps 1e-8) over the LoRA parameters.
Recorded: the conditioning, moments, latents, noise, loss, the global gradient norm,
and the gradients and updated values of the LoRA factors of four attention layers.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
model_dir = os.path.join(root, "tiny-sdxl")
out_dir = os.path.join(root, "training_sdxl")
data_dir = os.path.join(out_dir, "data")
os.makedirs(data_dir, exist_ok=True)
RESOLUTION = 32
CAPTION = "a red circle on a blue square"
MODULES = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.0.transformer_blocks.2.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0",
]

torch.manual_seed(0)
# The data: a 32 x 40 picture (a red disc over a blue rectangle on a gradient).
h, w = 40, 32
y, x = np.mgrid[0:h, 0:w].astype(np.float32)
img = np.stack([x / w * 200 + 30, y / h * 180 + 40, (x + y) / (w + h) * 120 + 60], -1)
img[(y > 8) & (y < 30) & (x > 4) & (x < 26)] = [40, 60, 220]
img[(y - 18) ** 2 + (x - 15) ** 2 < 49] = [230, 40, 30]
Image.fromarray(img.round().astype(np.uint8)).save(os.path.join(data_dir, "tall.png"))
with open(os.path.join(data_dir, "tall.txt"), "w") as f:
    f.write(CAPTION + "\n")

pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
te1, te2, vae, unet = pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet
scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")

# Preprocessing (preprocess_train): no resize needed, center crop, normalise.
image = Image.open(os.path.join(data_dir, "tall.png")).convert("RGB")
original_size = (image.height, image.width)
y1 = max(0, int(round((image.height - RESOLUTION) / 2.0)))
x1 = max(0, int(round((image.width - RESOLUTION) / 2.0)))
crop = image.crop((x1, y1, x1 + RESOLUTION, y1 + RESOLUTION))
pixels = torch.from_numpy(np.asarray(crop).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def tokenize(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompt(te1, te2):
    """The recipe's `encode_prompt`: each encoder's `hidden_states[-2]` concatenated,
    the pooled embedding from the last (text_encoder_2's `text_embeds`)."""
    embeds = []
    for tok, te in ((tok1, te1), (tok2, te2)):
        out = te(tokenize(tok, CAPTION), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.concat(embeds, dim=-1), pooled.view(1, -1)


with torch.no_grad():
    prompt_embeds, pooled = encode_prompt(te1, te2)
    add_time_ids = torch.tensor([list(original_size + (y1, x1) + (RESOLUTION, RESOLUTION))], dtype=torch.float32)
    dist = vae.encode(pixels).latent_dist
    g = torch.Generator().manual_seed(21)
    eps = torch.randn(dist.mean.shape, generator=g)
    latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
    latents = latents.repeat(2, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=g)
timesteps = torch.tensor([100, 700], dtype=torch.long)

unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
g = torch.Generator().manual_seed(22)
with torch.no_grad():
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
lora_params = [p for p in unet.parameters() if p.requires_grad]
initial_dir = os.path.join(out_dir, "initial_lora")
StableDiffusionXLPipeline.save_lora_weights(
    initial_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))

params = dict(unet.named_parameters())


def factor(module, which):
    return params[f"{module}.lora_{'A' if which == 'down' else 'B'}.default.weight"]


rec = {
    "pixels": pixels,
    "prompt_embeds": prompt_embeds,
    "pooled_prompt_embeds": pooled,
    "add_time_ids": add_time_ids,
    "moments_mean": dist.mean,
    "moments_logvar": dist.logvar,
    "latents": latents,
    "noise": noise,
    "timesteps": timesteps,
}
for m in MODULES:
    for which in ("down", "up"):
        rec[f"initial.{m}.{which}"] = factor(m, which).detach().clone()

unet.train()
optimizer = torch.optim.AdamW(lora_params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
noisy = scheduler.add_noise(latents, noise, timesteps)
pred = unet(noisy, timesteps, prompt_embeds.repeat(2, 1, 1),
            added_cond_kwargs={"time_ids": add_time_ids.repeat(2, 1), "text_embeds": pooled.repeat(2, 1)},
            return_dict=False)[0]
loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
loss.backward()
rec["loss"] = loss.detach().reshape(1)
rec["grad_norm"] = torch.nn.utils.clip_grad_norm_(lora_params, 1.0).reshape(1)
for m in MODULES:
    for which in ("down", "up"):
        rec[f"grad.{m}.{which}"] = factor(m, which).grad.detach().clone()
optimizer.step()
for m in MODULES:
    for which in ("down", "up"):
        rec[f"param.{m}.{which}"] = factor(m, which).detach().clone()
save_file({k: v.contiguous().float() for k, v in rec.items()}, os.path.join(root, "reference", "training_sdxl.safetensors"))
print(f"loss {loss.item():.6f}, grad norm {rec['grad_norm'].item():.4f}, time ids {add_time_ids.tolist()}")


# --------------------------------------------------------------------------------------
# Part 2, `--train_text_encoder`: LoRA on both text encoders as well (the recipe's
# `text_lora_config`: q_proj, k_proj, v_proj, out_proj, same rank and alpha), the
# caption encoded with gradients at the step, one AdamW step over every LoRA factor.
# Writes training_sdxl/initial_lora_te/ and reference/training_sdxl_te.safetensors.
# --------------------------------------------------------------------------------------
TE_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj"]
pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
te1, te2, unet = pipe.text_encoder, pipe.text_encoder_2, pipe.unet
for m in (unet, te1, te2):
    m.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
text_lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
# transformers' `add_adapter` wants a newer PEFT than PyPI has; PEFT's own injection
# is what it calls.
te1 = inject_adapter_in_model(text_lora, te1)
te2 = inject_adapter_in_model(text_lora, te2)
g = torch.Generator().manual_seed(23)
with torch.no_grad():
    for m in (unet, te1, te2):
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
StableDiffusionXLPipeline.save_lora_weights(
    os.path.join(out_dir, "initial_lora_te"),
    unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
    text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te1)),
    text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te2)))
lora_params = [p for m in (unet, te1, te2) for p in m.parameters() if p.requires_grad]
named = {"unet": dict(unet.named_parameters()), "te1": dict(te1.named_parameters()),
         "te2": dict(te2.named_parameters())}
watch = [("unet", m) for m in MODULES[:2]] + [(k, m) for k in ("te1", "te2") for m in TE_MODULES]


def factor2(model, module, which):
    # transformers 5's CLIPTextModel has no `text_model.` level (its keys, and the LoRA
    # files made from it, start at `encoder.`); CLIPTextModelWithProjection keeps it.
    suffix = f".lora_{'A' if which == 'down' else 'B'}.default.weight"
    params = named[model]
    key = module + suffix
    return params[key] if key in params else params[module.removeprefix("text_model.") + suffix]


rec = {"latents": latents, "noise": noise, "timesteps": timesteps, "add_time_ids": add_time_ids}
for model, m in watch:
    for which in ("down", "up"):
        rec[f"initial.{model}.{m}.{which}"] = factor2(model, m, which).detach().clone()
for m in (unet, te1, te2):
    m.train()
optimizer = torch.optim.AdamW(lora_params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
prompt_embeds, pooled = encode_prompt(te1, te2)
rec["prompt_embeds"] = prompt_embeds.detach().clone()
rec["pooled_prompt_embeds"] = pooled.detach().clone()
noisy = scheduler.add_noise(latents, noise, timesteps)
pred = unet(noisy, timesteps, prompt_embeds.repeat(2, 1, 1),
            added_cond_kwargs={"time_ids": add_time_ids.repeat(2, 1), "text_embeds": pooled.repeat(2, 1)},
            return_dict=False)[0]
loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
loss.backward()
rec["loss"] = loss.detach().reshape(1)
rec["grad_norm"] = torch.nn.utils.clip_grad_norm_(lora_params, 1.0).reshape(1)
for model, m in watch:
    for which in ("down", "up"):
        rec[f"grad.{model}.{m}.{which}"] = factor2(model, m, which).grad.detach().clone()
optimizer.step()
for model, m in watch:
    for which in ("down", "up"):
        rec[f"param.{model}.{m}.{which}"] = factor2(model, m, which).detach().clone()
save_file({k: v.contiguous().float() for k, v in rec.items()},
          os.path.join(root, "reference", "training_sdxl_te.safetensors"))
print(f"text encoders too: loss {loss.item():.6f}, grad norm {rec['grad_norm'].item():.4f}")
