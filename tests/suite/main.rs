//! The integration and parity tests, linked into one test binary (`cargo test --test
//! suite`): one link of the whole library per run instead of one per file, which keeps
//! build time and disk use down (each binary carries all of burn and wgpu).
mod common;

mod api;
mod batch;
mod configs;
mod content_credentials;
mod controlnet;
mod corrupt_files;
mod demo_model;
mod depth;
mod examples;
mod fast_paths;
mod fuzz;
mod fuzz_targets;
mod gguf_models;
mod hub;
mod lora;
mod models;
mod open_clip;
mod pipelines;
mod safety_checker;
mod schedulers;
mod sd3;
mod sd3_single_file;
mod sdxl;
mod server;
mod taesd;
mod tokenizer;
mod training;
mod watermark;
