//! The long fuzz run: `N` property-based inputs per target (default 100,000) to the
//! safetensors reader, config parsing, LoRA files, PNG metadata and request
//! validation (plus a smaller number of small requests run end to end), counting
//! panics. The test suite runs a short version of the same targets on every CI run.
//!
//! ```text
//! cargo run --release --example fuzz -- --cases 100000
//! ```

#[path = "../tests/suite/fuzz_targets.rs"]
mod fuzz_targets;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use clap::Parser;
use fuzz_targets as t;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Parser)]
#[command(about = "Fuzz the readers, parsers and request validation; count panics")]
struct Args {
    /// Inputs per target.
    #[arg(long, default_value_t = 100_000)]
    cases: u32,
    /// Inputs for the end-to-end request target (each runs the tiny model).
    #[arg(long, default_value_t = 2_000)]
    generate_cases: u32,
    /// Only the targets whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

/// Runs `cases` inputs of `strategy` through `target`; returns (inputs, panics).
fn run<S: Strategy>(name: &str, cases: u32, strategy: S, target: impl Fn(S::Value)) -> (u32, u32)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 0,
        ..Config::default()
    });
    let start = Instant::now();
    let panics = AtomicU32::new(0);
    let inputs = AtomicU32::new(0);
    let _ = runner.run(&strategy, |value| {
        inputs.fetch_add(1, Ordering::Relaxed);
        let shown = format!("{value:?}");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(value)));
        if let Err(payload) = outcome {
            panics.fetch_add(1, Ordering::Relaxed);
            let cut = shown
                .char_indices()
                .nth(400)
                .map_or(shown.len(), |(i, _)| i);
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            eprintln!("{name}: panic `{message}` on {}", &shown[..cut]);
        }
        Ok(())
    });
    let (inputs, panics) = (inputs.into_inner(), panics.into_inner());
    println!(
        "{name:<28} {inputs:>8} inputs {panics:>4} panics {:>8.1} s",
        start.elapsed().as_secs_f64()
    );
    (inputs, panics)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    std::panic::set_hook(Box::new(|_| {}));
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
    let f = t::fixtures(&root);
    let n = args.cases;
    let want = |name: &str| args.only.as_deref().is_none_or(|o| name.contains(o));
    let mut total_panics = 0;
    let mut tally = |(_, p): (u32, u32)| total_panics += p;
    if want("safetensors") {
        tally(run("safetensors (mutated)", n, t::mutation(), |m| {
            t::safetensors(&f, &m.apply(&f.safetensors))
        }));
        tally(run(
            "safetensors (synthetic)",
            n,
            t::synthetic_safetensors(),
            |b| t::safetensors(&f, &b),
        ));
    }
    if want("config") {
        tally(run(
            "config (mutated)",
            n,
            t::mutated_config(),
            |(w, i, v)| t::config(&f, &t::apply_config_mutation(&f, w, &i, &v)),
        ));
    }
    if want("lora") {
        tally(run(
            "lora (mutated)",
            n,
            (t::mutation(), any::<bool>()),
            |(m, k)| {
                t::lora(
                    &f,
                    &m.apply(if k { &f.lora_kohya } else { &f.lora_diffusers }),
                )
            },
        ));
    }
    if want("gguf") {
        tally(run("gguf (mutated)", n, t::mutation(), |m| {
            t::gguf(&f, &m.apply(&f.gguf))
        }));
    }
    if want("png") {
        tally(run(
            "png metadata (mutated)",
            n,
            (t::mutation(), ".{0,80}"),
            |(m, s)| t::png(&f, &m.apply(&f.png), &s),
        ));
    }
    if want("request") {
        tally(run("request validation", n, t::request_input(), |i| {
            t::validate(&f, &i)
        }));
        let ran = AtomicU32::new(0);
        let count = |o: t::Outcome| {
            if o == t::Outcome::Ran {
                ran.fetch_add(1, Ordering::Relaxed);
            }
        };
        let cases = args.generate_cases;
        tally(run("request run (any)", cases, t::request_input(), |i| {
            count(t::generate(&f, &i))
        }));
        tally(run(
            "request run (mostly valid)",
            cases,
            t::valid_request_input(),
            |i| count(t::generate(&f, &i)),
        ));
        println!("requests run end to end: {}", ran.load(Ordering::Relaxed));
    }
    println!("total panics: {total_panics}");
    if total_panics == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
