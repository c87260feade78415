//! The short version of the fuzz run (`examples/fuzz.rs` runs 100,000 inputs per
//! target; here a fixed seed keeps CI deterministic): property-based inputs to the safetensors reader, config parsing, LoRA
//! files, GGUF files, PNG metadata and request validation; none may panic.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use stable_diffusion::io::image::GenerationParameters;

use crate::common::fixture;
use crate::fuzz_targets::{self as t, Fixtures};

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| t::fixtures(&fixture("")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, rng_seed: RngSeed::Fixed(2026), ..ProptestConfig::default() })]

    #[test]
    fn safetensors_reader_never_panics(
        m in t::mutation(),
        raw in proptest::collection::vec(any::<u8>(), 0..96),
        synthetic in t::synthetic_safetensors(),
    ) {
        let f = fixtures();
        t::safetensors(f, &m.apply(&f.safetensors));
        t::safetensors(f, &raw);
        t::safetensors(f, &synthetic);
    }

    #[test]
    fn config_parsing_never_panics((which, field, value) in t::mutated_config(), raw in ".{0,64}") {
        let f = fixtures();
        t::config(f, &t::apply_config_mutation(f, which, &field, &value));
        t::config(f, &raw);
    }

    #[test]
    fn lora_files_never_panic(m in t::mutation(), kohya in any::<bool>()) {
        let f = fixtures();
        let valid = if kohya { &f.lora_kohya } else { &f.lora_diffusers };
        t::lora(f, &m.apply(valid));
    }

    #[test]
    fn gguf_reader_never_panics(m in t::mutation(), raw in proptest::collection::vec(any::<u8>(), 0..96)) {
        let f = fixtures();
        t::gguf(f, &m.apply(&f.gguf));
        let mut headed = b"GGUF\x03\0\0\0".to_vec();
        headed.extend_from_slice(&raw);
        t::gguf(f, &headed);
    }

    #[test]
    fn png_metadata_never_panics(m in t::mutation(), text in ".{0,80}") {
        let f = fixtures();
        t::png(f, &m.apply(&f.png), &text);
    }

    #[test]
    fn a1111_parameters_read_back(p in t::parameters()) {
        prop_assert_eq!(GenerationParameters::parse_a1111(&p.to_a1111()), Some(p));
    }

    #[test]
    fn request_validation_never_panics(input in t::request_input()) {
        t::validate(fixtures(), &input);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, rng_seed: RngSeed::Fixed(2026), ..ProptestConfig::default() })]

    #[test]
    fn small_requests_run_or_fail_cleanly(input in t::request_input()) {
        t::generate(fixtures(), &input);
    }

    #[test]
    fn valid_requests_run(input in t::valid_request_input()) {
        prop_assert_eq!(t::generate(fixtures(), &input), t::Outcome::Ran, "{:?}", input);
    }
}
