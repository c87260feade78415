#!/usr/bin/env python
"""SDXL base 1.0 shapes with random weights, and PyTorch + diffusers timings on them
(docs/performance.md, issue 14's real-size figures).

    python scripts/sdxl_random.py build OUT_DIR            # diffusers folder, fp16 weights (~7 GB)
    python scripts/sdxl_random.py time OUT_DIR --json t.json [--threads 2] [--runs 1]

`build` makes a StableDiffusionXLPipeline folder from tests/fixtures/configs/sdxl
(U-Net, VAE, both text encoders, tokenizers, scheduler), weights initialised by
PyTorch under a fixed seed and saved in fp16. `time` loads them in float32 and times,
after one warm-up each, the U-Net step (batch 2, 4x128x128, context 2x77x2048,
pooled 2x1280, time ids 2x6, t = 500), the VAE decode of 1x4x128x128 to 1024x1024
(untiled, as the pipeline does by default) and both text encoders on 1x77 ids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(ROOT, "tests", "fixtures", "configs", "sdxl")


def load_cfg(component: str) -> dict:
    with open(os.path.join(CONFIGS, component, "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def build(out: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1234)
    for name, make in [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**load_cfg("text_encoder")))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**load_cfg("text_encoder_2")))),
        ("vae", lambda: AutoencoderKL(**load_cfg("vae"))),
        ("unet", lambda: UNet2DConditionModel(**load_cfg("unet"))),
    ]:
        m = make().half()
        m.save_pretrained(os.path.join(out, name), safe_serialization=True)
        del m
    shutil.copytree(os.path.join(CONFIGS, "scheduler"), os.path.join(out, "scheduler"), dirs_exist_ok=True)
    # The real CLIP BPE files (the configs folder holds only tokenizer configs).
    tiny = os.path.join(ROOT, "tests", "fixtures", "tiny-sdxl")
    for tok in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(tiny, tok), os.path.join(out, tok), dirs_exist_ok=True)
    shutil.copy(os.path.join(CONFIGS, "model_index.json"), os.path.join(out, "model_index.json"))


def median(fn, runs: int) -> dict:
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs_s": times, "warmup_s": warm}


@torch.inference_mode()
def time_models(model: str, out_json: str, threads: int, runs: int) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    res = {}
    te1 = CLIPTextModel.from_pretrained(os.path.join(model, "text_encoder"), torch_dtype=torch.float32).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(model, "text_encoder_2"),
                                                      torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    res["text_encoder_1x77"] = median(lambda: te1(ids, output_hidden_states=True), runs)
    res["text_encoder_2_1x77"] = median(lambda: te2(ids, output_hidden_states=True), runs)
    del te1, te2
    vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae"), torch_dtype=torch.float32).eval()
    z = torch.randn(1, 4, 128, 128, generator=g)
    res["vae_decode_1x4x128x128"] = median(lambda: vae.decode(z), runs)
    del vae
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model, "unet"), torch_dtype=torch.float32).eval()
    x = torch.randn(2, 4, 128, 128, generator=g)
    ctx = torch.randn(2, 77, 2048, generator=g)
    added = {"text_embeds": torch.randn(2, 1280, generator=g),
             "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    t = torch.tensor([500.0, 500.0])
    res["unet_b2_4x128x128"] = median(lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added), runs)
    import diffusers
    out = {"threads": threads, "torch": torch.__version__, "diffusers": diffusers.__version__, "timings": res}
    with open(out_json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["build", "time"])
    ap.add_argument("dir")
    ap.add_argument("--json", default="/tmp/sdxl-torch.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    if a.what == "build":
        build(a.dir)
    else:
        time_models(a.dir, a.json, a.threads, a.runs)


if __name__ == "__main__":
    main()
