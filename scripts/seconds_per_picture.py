#!/usr/bin/env python
"""Seconds per picture with PyTorch + diffusers on SD 1.5 shapes (random weights), the
PyTorch side of docs/performance.md's few-step table (issue 16). Also makes the
inputs both sides share when missing: a random-weight TAESD folder
(``configs/taesd``) and a random LCM-LoRA-shaped LoRA for SD 1.5 (rank 64, the
modules latent-consistency/lcm-lora-sdv1-5 adapts, kohya layout).

    python scripts/seconds_per_picture.py MODEL_DIR WORK_DIR --threads 2 --json out.jsonl [--only ROW]

MODEL_DIR is a folder from ../shared/bench/make_sd15_random.py. Rows (512x512, f32,
one picture each, after one untimed 1-step warm-up at the same size, loading excluded):
  dpmpp20, dpmpp20_tiny: DPM++ 2M, 20 steps, CFG 7.5 (VAE / TAESD decode)
  lcm4, lcm4_tiny: LCM, 4 steps, guidance 1, the LCM-LoRA fused
  turbo1, turbo1_tiny: Euler ancestral with trailing spacing, 1 step, guidance 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]

ROWS = {
    "dpmpp20": dict(scheduler="DPMSolverMultistepScheduler", overrides={}, steps=20, guidance=7.5, lora=False),
    "lcm4": dict(scheduler="LCMScheduler", overrides={}, steps=4, guidance=1.0, lora=True),
    "turbo1": dict(scheduler="EulerAncestralDiscreteScheduler", overrides={"timestep_spacing": "trailing"}, steps=1,
                   guidance=1.0, lora=False),
}


def make_inputs(model_dir: str, work: str) -> tuple[str, str]:
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    taesd = os.path.join(work, "taesd-random")
    if not os.path.exists(os.path.join(taesd, "config.json")):
        with open(os.path.join(ROOT, "tests", "fixtures", "configs", "taesd", "config.json")) as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "block_out_channels"}
        torch.manual_seed(0)
        AutoencoderTiny(**cfg).save_pretrained(taesd, safe_serialization=True)
    lora = os.path.join(work, "lcm-lora-random.safetensors")
    if not os.path.exists(lora):
        unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
        unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=LCM_LORA_TARGETS,
                                    init_lora_weights="gaussian"))
        kohya = {}
        for k, v in get_peft_model_state_dict(unet).items():
            module, kind = k.rsplit(".lora_", 1)
            name = "lora_unet_" + module.replace(".", "_")
            kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = v.contiguous()
            kohya[f"{name}.alpha"] = torch.tensor(64.0)
        save_file(kohya, lora)
    return taesd, lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("work_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    ap.add_argument("--only", action="append")
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.work_dir, exist_ok=True)
    taesd_dir, lora = make_inputs(a.model_dir, a.work_dir)
    if a.only == ["inputs"]:
        return
    import diffusers
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    out = open(a.json, "a")
    for name, row in ROWS.items():
        for tiny in (False, True):
            label = name + ("_tiny" if tiny else "")
            if a.only and label not in a.only:
                continue
            t0 = time.perf_counter()
            pipe = StableDiffusionPipeline.from_pretrained(a.model_dir, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False, local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = getattr(diffusers, row["scheduler"]).from_config(pipe.scheduler.config,
                                                                              **row["overrides"])
            if row["lora"]:
                pipe.load_lora_weights(lora)
                pipe.fuse_lora()
                pipe.unload_lora_weights()
            if tiny:
                pipe.vae = AutoencoderTiny.from_pretrained(taesd_dir)
            load_s = time.perf_counter() - t0
            kw = dict(prompt="a photograph of an astronaut riding a horse", height=a.size, width=a.size,
                      guidance_scale=row["guidance"], generator=torch.Generator().manual_seed(0), output_type="np")
            with torch.no_grad():
                pipe(num_inference_steps=1, **kw)
                t0 = time.perf_counter()
                pipe(num_inference_steps=row["steps"], **kw)
                seconds = time.perf_counter() - t0
            rec = {"row": label, "side": "pytorch", "seconds": seconds, "load_s": load_s,
                   "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": a.threads}
            print(json.dumps(rec), flush=True)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            del pipe


if __name__ == "__main__":
    main()
