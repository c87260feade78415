//! criterion benches of the pieces that decide Stable Diffusion's speed, at SD 1.5
//! sizes (512x512, so 64x64 latents), on the CPU backend, and of the watermark at
//! SDXL's 1024x1024:
//!
//! ```text
//! cargo bench --bench components               # all
//! cargo bench --bench components -- attention  # one group
//! ```
//!
//! Whole-model figures against PyTorch come from the `bench` example
//! (docs/performance.md); these exist so a regression in one piece is visible.

use criterion::{Criterion, criterion_group, criterion_main};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::burn::tensor::Distribution;
use stable_diffusion::core::{NoiseRng, Scheduler, Steps};
use stable_diffusion::io::ClipTokenizer;
use stable_diffusion::models::attention::multi_head_attention;
use stable_diffusion::models::norm::GroupNorm;
use stable_diffusion::models::resnet::{ResnetBlock2D, ResnetSettings};
use stable_diffusion::models::transformer_2d::BasicTransformerBlock;
use stable_diffusion::schedulers::{AnyScheduler, SchedulerConfig};

fn randn<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// Forces the lazy work of `x` to finish before the timer stops.
fn done<const D: usize>(x: Tensor<D>) {
    let device = x.device();
    std::hint::black_box(x);
    device.sync().expect("device sync");
}

fn attention(c: &mut Criterion) {
    let device = Device::flex();
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    // (name, batch, n_q, n_kv, width, heads): SD 1.5 U-Net levels and the VAE mid block.
    let cases = [
        ("self_4096x320_h8", 2, 4096, 4096, 320, 8),
        ("self_1024x640_h8", 2, 1024, 1024, 640, 8),
        ("cross_4096x320_ctx77", 2, 4096, 77, 320, 8),
        ("vae_4096x512_h1", 1, 4096, 4096, 512, 1),
        ("clip_77x768_h12_causal", 1, 77, 77, 768, 12),
    ];
    for (name, b, n, m, w, heads) in cases {
        let q = randn([b, n, w], &device);
        let k = randn([b, m, w], &device);
        let v = randn([b, m, w], &device);
        let causal = name.ends_with("causal");
        g.bench_function(name, |bench| {
            bench.iter(|| {
                done(multi_head_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    heads,
                    causal,
                ))
            })
        });
    }
    g.finish();
}

fn blocks(c: &mut Criterion) {
    let device = Device::flex();
    let mut g = c.benchmark_group("blocks");
    g.sample_size(10);
    let settings = ResnetSettings {
        temb_channels: Some(1280),
        groups: 32,
        eps: 1e-5,
        output_scale_factor: 1.0,
    };
    let resnet = ResnetBlock2D::new(320, 320, settings, &device);
    let x = randn([2, 320, 64, 64], &device);
    let temb = randn([2, 1280], &device);
    g.bench_function("resnet_320_64x64_b2", |b| {
        b.iter(|| done(resnet.forward(x.clone(), Some(temb.clone()))))
    });
    let norm = GroupNorm::new(32, 320, 1e-5, &device);
    g.bench_function("group_norm_silu_320_64x64_b2", |b| {
        b.iter(|| done(norm.forward_silu(x.clone())))
    });
    let block = BasicTransformerBlock::new(320, 768, 8, &device);
    let hs = randn([2, 4096, 320], &device);
    let context = randn([2, 77, 768], &device);
    g.bench_function("transformer_block_4096x320_b2", |b| {
        b.iter(|| done(block.forward(hs.clone(), context.clone())))
    });
    g.finish();
}

/// 3x3 "same" convolutions at the U-Net's levels (batch 2) and the VAE decoder's
/// (batch 1): the im2col path against Winograd F(4x4, 3x3), on raw slices.
fn conv3x3(c: &mut Criterion) {
    use sd_kernels::internals::conv3x3;
    use sd_kernels::internals::{ConvShape, conv2d_im2col};
    let mut g = c.benchmark_group("conv3x3");
    g.sample_size(10);
    for (batch, ch, side) in [
        (2, 320, 64),
        (2, 640, 32),
        (2, 1280, 16),
        (2, 1280, 8),
        (1, 512, 64),
        (1, 256, 256),
    ] {
        let s = ConvShape {
            batch,
            c_in: ch,
            h: side,
            w: side,
            c_out: ch,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            padding: [1; 4],
        };
        let x: Vec<f32> = (0..batch * ch * side * side)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..ch * ch * 9)
            .map(|i| ((i * 13) % 17) as f32 / 80.0 - 0.1)
            .collect();
        let bias = vec![0.1f32; ch];
        let name = format!("{ch}_{side}x{side}_b{batch}");
        g.bench_function(format!("im2col_{name}"), |b| {
            b.iter(|| std::hint::black_box(conv2d_im2col(&x, &w, Some(&bias), s)))
        });
        g.bench_function(format!("winograd_{name}"), |b| {
            b.iter(|| std::hint::black_box(conv3x3(&x, &w, Some(&bias), s)))
        });
    }
    g.finish();
}

/// The transformer blocks' linear layers at the 64x64 level (batch 2, 8192 rows):
/// a 320 -> 320 projection, the GEGLU projection 320 -> 2 x 1280 with its
/// `a * gelu(gate)`, and the feed-forward's 1280 -> 320; plus the text encoder's
/// 77 x 768 -> 3072. On raw slices; the weight packing is part of each call.
fn linear(c: &mut Criterion) {
    use sd_kernels::internals::{Matrix, linear, linear_geglu};
    let mut g = c.benchmark_group("linear");
    g.sample_size(10);
    for (name, rows, d_in, d_out, geglu) in [
        ("8192x320_to_320", 8192, 320, 320, false),
        ("8192x320_geglu_2x1280", 8192, 320, 2560, true),
        ("8192x1280_to_320", 8192, 1280, 320, false),
        ("2048x640_to_640", 2048, 640, 640, false),
        ("512x1280_to_1280", 512, 1280, 1280, false),
        ("2048x640_geglu_2x2560", 2048, 640, 5120, true),
        ("512x1280_geglu_2x5120", 512, 1280, 10240, true),
        ("154x768_to_1280", 154, 768, 1280, false),
        ("77x768_to_3072", 77, 768, 3072, false),
        ("77x3072_to_768", 77, 3072, 768, false),
    ] {
        let x: Vec<f32> = (0..rows * d_in)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..d_out * d_in)
            .map(|i| ((i * 13) % 17) as f32 / 80.0 - 0.1)
            .collect();
        let bias = vec![0.1f32; d_out];
        let xm = Matrix {
            data: &x,
            row_stride: d_in as isize,
            col_stride: 1,
        };
        let wm = Matrix {
            data: &w,
            row_stride: d_in as isize,
            col_stride: 1,
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                std::hint::black_box(if geglu {
                    linear_geglu(xm, rows, d_in, wm, d_out / 2, Some(&bias))
                } else {
                    linear(xm, rows, d_in, wm, d_out, Some(&bias))
                })
            })
        });
    }
    g.finish();
}

fn scheduler_and_tokenizer(c: &mut Criterion) {
    let device = Device::flex();
    let mut g = c.benchmark_group("host");
    let config = SchedulerConfig::default();
    for name in ["euler-a", "dpmpp-2m"] {
        let scheduler = AnyScheduler::from_name(name, &config).expect("known scheduler");
        let sample = randn([1, 4, 64, 64], &device);
        let output = randn([1, 4, 64, 64], &device);
        g.bench_function(format!("scheduler_step_{name}"), |b| {
            b.iter(|| {
                let mut run = scheduler.start(&Steps::Count(20)).expect("20 steps");
                let mut noise = NoiseRng::seed(0);
                let out = run
                    .step(output.clone(), 0, sample.clone(), &mut noise)
                    .expect("step");
                done(out.prev_sample)
            })
        });
    }
    let tokenizer = ClipTokenizer::clip("<|endoftext|>").expect("embedded CLIP tokenizer");
    g.bench_function("tokenize_prompt", |b| {
        b.iter(|| {
            tokenizer
                .encode("a photograph of an astronaut riding a horse on mars, highly detailed")
                .expect("tokenize")
        })
    });
    g.finish();
}

/// SDXL's invisible watermark on one 1024x1024 picture, and reading it back.
fn watermark(c: &mut Criterion) {
    use stable_diffusion::io::watermark::DwtDctWatermark;
    let mut g = c.benchmark_group("watermark");
    let wm = DwtDctWatermark::sdxl();
    let (w, h) = (1024, 1024);
    let picture: Vec<f32> = (0..3 * w * h)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    g.bench_function("embed_1024", |b| {
        b.iter(|| {
            let mut x = picture.clone();
            wm.apply_to_decoded(&mut x, w, h);
            std::hint::black_box(x)
        })
    });
    let rgb: Vec<f32> = picture.iter().map(|v| (v + 1.0) * 127.5).collect();
    g.bench_function("decode_1024", |b| b.iter(|| wm.decode(&rgb, w, h)));
    g.finish();
}

criterion_group!(
    benches,
    attention,
    blocks,
    conv3x3,
    linear,
    scheduler_and_tokenizer,
    watermark
);
criterion_main!(benches);
