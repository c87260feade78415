"""PyTorch + diffusers timing of one SD 3 transformer step, the shapes of
`cargo run --release --example bench -- --config DIR --component transformer`:
`--batch` latents 16 x H/8 x W/8, 77 + 256 text tokens, the pooled embedding,
timestep 500, random weights from DIR/transformer/config.json, f32 on the CPU.

    python benches/pytorch_sd3_transformer.py tests/fixtures/configs/sd35-medium \
        --height 512 --width 512 --batch 2 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config_dir")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    import torch
    import diffusers

    torch.set_num_threads(a.threads)
    with open(os.path.join(a.config_dir, "transformer", "config.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    t0 = time.perf_counter()
    model = diffusers.SD3Transformer2DModel(**cfg).eval()
    load_s = time.perf_counter() - t0
    b, lh, lw = a.batch, a.height // 8, a.width // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn((b, cfg["in_channels"], lh, lw), generator=g)
    ctx = torch.randn((b, 333, cfg["joint_attention_dim"]), generator=g)
    pooled = torch.randn((b, cfg["pooled_projection_dim"]), generator=g)
    t = torch.full((b,), 500.0)
    times = []
    with torch.no_grad():
        model(sample, ctx, pooled, t)  # warm-up
        for _ in range(a.runs):
            t0 = time.perf_counter()
            model(sample, ctx, pooled, t)
            times.append(time.perf_counter() - t0)
    times.sort()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"component": "transformer", "impl": "pytorch", "torch": torch.__version__,
                      "diffusers": diffusers.__version__, "median_s": times[len(times) // 2], "min_s": times[0],
                      "max_s": times[-1], "peak_rss_mb": rss, "load_s": load_s, "batch": b,
                      "height": a.height, "width": a.width, "threads": a.threads}))


if __name__ == "__main__":
    main()
