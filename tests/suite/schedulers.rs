//! Scheduler parity with diffusers (fixtures README 4d and 7): every variant and step
//! count of `reference/schedulers/*.safetensors`, the tables, Align Your Steps, and
//! properties of the schedules.

use crate::common;

use common::{Reference, fixture};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::{
    NoiseRng, NoiseSource, RecordedNoise, Scheduler, SchedulerRun, Steps,
};
use stable_diffusion::schedulers::{
    AnyScheduler, AysPreset, NoiseSchedule, SchedulerConfig, SigmaSchedule,
};

fn index() -> serde_json::Value {
    crate::common::read_index("index.json")
}

fn base_config_json() -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixture("tiny-sd15/scheduler/scheduler_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn scheduler_for(case: &serde_json::Value) -> AnyScheduler {
    let params = &case["params"];
    let mut json = base_config_json();
    for (k, v) in params["overrides"].as_object().unwrap() {
        json[k] = v.clone();
    }
    let config = SchedulerConfig::from_json(&json.to_string()).unwrap();
    let any = AnyScheduler::from_class(params["class"].as_str().unwrap(), &config).unwrap();
    match (
        any,
        params["step_kwargs"].get("eta").and_then(|e| e.as_f64()),
    ) {
        (AnyScheduler::Ddim(d), Some(eta)) => AnyScheduler::Ddim(d.with_eta(eta)),
        (any, _) => any,
    }
}

fn rel_close(what: &str, got: &[f64], want: &[f32], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w = *w as f64;
        assert!(
            (g - w).abs() <= rel * w.abs().max(1e-12) + 1e-12,
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn tensor_close(what: &str, got: &Tensor<4>, want: &[f32], rel: f32) {
    crate::common::assert_rel_close(what, &crate::common::values(got), want, rel);
}

fn slice(r: &Reference, key: &str, i: usize, device: &Device) -> (Tensor<4>, Vec<f32>) {
    let shape = r.shape(key);
    let per: usize = shape[1..].iter().product();
    let all = r.floats(key);
    let v = all[i * per..(i + 1) * per].to_vec();
    let t = Tensor::from_data(TensorData::new(v.clone(), shape[1..].to_vec()), device);
    (t, v)
}

/// Checks one recorded trajectory (keys `{p}...`, e.g. `n4.`) against `run`: the
/// timesteps (exact when stored as integers), sigmas, `init_noise_sigma` (within
/// `init_tol` relative), the step count, then every step's scaled input, previous
/// sample and estimate of the clean sample (`pred_original_samples`, or LCM's
/// `denoised`). The recorded step noises are replayed, and every one must be drawn.
fn check_trajectory(
    what: &str,
    r: &Reference,
    p: &str,
    mut run: Box<dyn SchedulerRun>,
    init_tol: f64,
    device: &Device,
) {
    let ts_key = format!("{p}timesteps");
    if r.source_dtype_is_int(&ts_key) {
        let got: Vec<i64> = run.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(got, r.ints(&ts_key), "{what} timesteps");
    } else {
        rel_close(
            &format!("{what} timesteps"),
            run.timesteps(),
            &r.floats(&ts_key),
            1e-6,
        );
    }
    if r.has(&format!("{p}sigmas")) {
        rel_close(
            &format!("{what} sigmas"),
            run.sigmas().unwrap(),
            &r.floats(&format!("{p}sigmas")),
            1e-6,
        );
    }
    let init = r.floats(&format!("{p}init_noise_sigma"))[0] as f64;
    assert!(
        (run.init_noise_sigma() - init).abs() <= init_tol * init.max(1.0),
        "{what} init_noise_sigma {} vs {init}",
        run.init_noise_sigma()
    );
    let steps = r.shape(&format!("{p}model_outputs"))[0];
    assert_eq!(run.len(), steps, "{what} step count");
    let noise_key = format!("{p}step_noises");
    let draws = if r.has(&noise_key) {
        r.shape(&noise_key)[0]
    } else {
        0
    };
    let mut noise = RecordedNoise::new(
        (0..draws)
            .map(|i| slice(r, &noise_key, i, device).0)
            .collect(),
    );
    let mut sample = r.tensor::<4>(&format!("{p}initial_sample"), device);
    for i in 0..steps {
        let scaled = run.scale_model_input(sample.clone(), i).unwrap();
        tensor_close(
            &format!("{what} scaled_model_inputs[{i}]"),
            &scaled,
            &slice(r, &format!("{p}scaled_model_inputs"), i, device).1,
            1e-5,
        );
        let (out, _) = slice(r, &format!("{p}model_outputs"), i, device);
        let step = run.step(out, i, sample, &mut noise).unwrap();
        tensor_close(
            &format!("{what} prev_samples[{i}]"),
            &step.prev_sample,
            &slice(r, &format!("{p}prev_samples"), i, device).1,
            1e-5,
        );
        for key in ["pred_original_samples", "denoised"] {
            if r.has(&format!("{p}{key}")) {
                let x0 = step.pred_original_sample.clone().expect(key);
                tensor_close(
                    &format!("{what} {key}[{i}]"),
                    &x0,
                    &slice(r, &format!("{p}{key}"), i, device).1,
                    1e-5,
                );
            }
        }
        sample = step.prev_sample;
    }
    assert_eq!(noise.remaining(), 0, "{what}: every recorded draw used");
}

fn check_case(name: &str, case: &serde_json::Value) {
    let device = Device::flex();
    let r = Reference::open(&format!("reference/{}", case["file"].as_str().unwrap()));
    let scheduler = scheduler_for(case);
    let kwargs = &case["params"]["set_timesteps_kwargs"];
    let mut checked = 0;
    let steps_for = |n: usize| {
        if let Some(s) = kwargs.get("sigmas") {
            Steps::Sigmas(
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect(),
            )
        } else if let Some(t) = kwargs.get("timesteps") {
            Steps::Timesteps(
                t.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect(),
            )
        } else {
            Steps::Count(n)
        }
    };
    for n in [1usize, 4, 10, 20, 50] {
        let p = format!("n{n}.");
        if !r.has(&format!("{p}timesteps")) {
            continue;
        }
        let run = scheduler.start(&steps_for(n)).unwrap();
        check_trajectory(&format!("{name} n={n}"), &r, &p, run, 1e-6, &device);
        checked += 1;
    }
    assert!(checked > 0, "{name}: no step counts");
    if r.has("add_noise.result") {
        let run = scheduler.start(&steps_for(10)).unwrap();
        let original = r.tensor::<4>("add_noise.original", &device);
        let noise = r.tensor::<4>("add_noise.noise", &device);
        let want_t = if r.source_dtype_is_int("add_noise.timestep") {
            r.ints("add_noise.timestep")[0] as f64
        } else {
            r.floats("add_noise.timestep")[0] as f64
        };
        assert!(
            (run.timestep(4).unwrap() - want_t).abs() <= 1e-3,
            "{name} add_noise timestep {} vs {want_t}",
            run.timestep(4).unwrap()
        );
        let got = run.add_noise(original, noise, 4).unwrap();
        tensor_close(
            &format!("{name} add_noise"),
            &got,
            &r.floats("add_noise.result"),
            1e-5,
        );
    }
}

#[test]
fn every_scheduler_case_matches_diffusers() {
    let index = index();
    let cases = index["cases"].as_object().unwrap();
    let mut n = 0;
    for (name, case) in cases {
        if name.starts_with("schedulers/") && name != "schedulers/tables" {
            check_case(name, case);
            n += 1;
        }
    }
    assert_eq!(n, 18);
}

#[test]
fn tables_match_diffusers() {
    let r = Reference::open("reference/schedulers/tables.safetensors");
    let config = SchedulerConfig::from_json(&base_config_json().to_string()).unwrap();
    let s = NoiseSchedule::from_config(&config).unwrap();
    let betas: Vec<f64> = s.betas.iter().map(|&x| x as f64).collect();
    rel_close("betas", &betas, &r.floats("betas"), 1e-6);
    let ac: Vec<f64> = s.alphas_cumprod.iter().map(|&x| x as f64).collect();
    rel_close("alphas_cumprod", &ac, &r.floats("alphas_cumprod"), 1e-6);
    let sig: Vec<f64> = s.train_sigmas().iter().map(|&x| x as f64).collect();
    rel_close("train_sigmas", &sig, &r.floats("train_sigmas"), 1e-6);
    rel_close(
        "AYS SD sigmas",
        &AysPreset::Sd15.sigmas(10),
        &r.floats("ays.StableDiffusionSigmas"),
        1e-6,
    );
    rel_close(
        "AYS SD timesteps",
        &AysPreset::Sd15.timesteps(10),
        &r.floats("ays.StableDiffusionTimesteps"),
        0.0,
    );
    rel_close(
        "AYS SDXL sigmas",
        &AysPreset::Sdxl.sigmas(10),
        &r.floats("ays.StableDiffusionXLSigmas"),
        1e-6,
    );
    rel_close(
        "AYS SDXL timesteps",
        &AysPreset::Sdxl.timesteps(10),
        &r.floats("ays.StableDiffusionXLTimesteps"),
        0.0,
    );
}

#[test]
fn ays_interpolation_is_smooth_and_monotone() {
    for preset in [AysPreset::Sd15, AysPreset::Sdxl] {
        for n in [5, 20, 50] {
            let s = preset.sigmas(n);
            assert_eq!(s.len(), n + 1);
            assert_eq!(s[n], 0.0);
            assert!((s[0] - 14.615).abs() < 1e-9);
            assert!(s.windows(2).all(|w| w[1] < w[0]), "{preset:?} {n}: {s:?}");
            // Smooth: consecutive log-ratios change gradually.
            let logs: Vec<f64> = s[..n].iter().map(|x| x.ln()).collect();
            let steps: Vec<f64> = logs.windows(2).map(|w| w[0] - w[1]).collect();
            let max_step = steps.iter().cloned().fold(0.0, f64::max);
            assert!(
                max_step < 2.0 * 10.0 / n as f64 + 0.5,
                "{preset:?} {n}: {steps:?}"
            );
            let t = preset.timesteps(n);
            assert_eq!(t.len(), n);
            assert!(t.windows(2).all(|w| w[1] < w[0]), "{preset:?} {n}: {t:?}");
        }
    }
}

fn all_schedulers() -> Vec<(String, AnyScheduler)> {
    let base = SchedulerConfig::from_json(&base_config_json().to_string()).unwrap();
    let mut out = Vec::new();
    for spacing in ["leading", "trailing", "linspace"] {
        let mut c = base.clone();
        c.timestep_spacing = Some(spacing.into());
        for name in [
            "ddim",
            "euler",
            "euler-a",
            "dpmpp-2m",
            "dpmpp-2m-karras",
            "lms",
            "pndm",
        ] {
            out.push((
                format!("{name}/{spacing}"),
                AnyScheduler::from_name(name, &c).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn schedules_honour_every_step_count() {
    for (name, s) in all_schedulers() {
        for n in 1..=100 {
            let run = s.start(&Steps::Count(n)).unwrap();
            let expected = if name.starts_with("pndm") && n > 1 {
                n + 1
            } else {
                n
            };
            assert_eq!(run.len(), expected, "{name} n={n}");
            assert!(
                run.timesteps()
                    .iter()
                    .all(|t| t.is_finite() && *t >= 0.0 && *t <= 999.0),
                "{name} n={n}: {:?}",
                run.timesteps()
            );
            if let Some(sig) = run.sigmas() {
                assert_eq!(sig.len(), n + 1, "{name} n={n}");
                assert_eq!(*sig.last().unwrap(), 0.0, "{name} n={n}");
                assert!(
                    sig.windows(2).all(|w| w[1] <= w[0]),
                    "{name} n={n}: {sig:?}"
                );
            }
        }
    }
}

#[test]
fn steps_produce_no_nan() {
    let device = Device::flex();
    for (name, s) in all_schedulers() {
        for n in [1, 2, 3, 7, 25] {
            let mut run = s.start(&Steps::Count(n)).unwrap();
            let mut rng = NoiseRng::seed(1);
            let mut x = rng.normal([1, 4, 4, 4], &device).unwrap() * run.init_noise_sigma();
            for i in 0..run.len() {
                let model_in = run.scale_model_input(x.clone(), i).unwrap();
                let eps = model_in * 0.1;
                x = run.step(eps, i, x, &mut rng).unwrap().prev_sample;
            }
            let v = x.to_data().try_to_vec::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name} n={n}");
        }
    }
}

#[test]
fn interleaved_runs_equal_sequential_runs() {
    let device = Device::flex();
    let base = SchedulerConfig::from_json(&base_config_json().to_string()).unwrap();
    for name in ["euler-a", "dpmpp-2m", "lms", "pndm"] {
        let s = AnyScheduler::from_name(name, &base).unwrap();
        let go = |seed: u64, interleave_with: Option<u64>| {
            let mut a = s.start(&Steps::Count(6)).unwrap();
            let mut ra = NoiseRng::seed(seed);
            let mut xa = ra.normal([1, 4, 4, 4], &device).unwrap();
            let mut other =
                interleave_with.map(|s2| (s.start(&Steps::Count(6)).unwrap(), NoiseRng::seed(s2)));
            let mut xb = Tensor::<4>::ones([1, 4, 4, 4], &device);
            for i in 0..a.len() {
                xa = a
                    .step(xa.clone() * 0.3, i, xa, &mut ra)
                    .unwrap()
                    .prev_sample;
                if let Some((b, rb)) = other.as_mut() {
                    xb = b.step(xb.clone() * 0.2, i, xb, rb).unwrap().prev_sample;
                }
            }
            xa.to_data().try_to_vec::<f32>().unwrap()
        };
        assert_eq!(go(7, None), go(7, Some(9)), "{name}");
    }
}

#[test]
fn configs_with_infinity_and_foreign_keys_are_accepted() {
    let text = r#"{"_class_name": "PNDMScheduler", "lambda_min_clipped": -Infinity, "use_karras_sigmas": true,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "skip_prk_steps": true, "steps_offset": 1}"#;
    let s = AnyScheduler::from_json(text).unwrap();
    // PNDM ignores use_karras_sigmas, as diffusers does.
    let run = s.start(&Steps::Count(4)).unwrap();
    assert_eq!(run.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
    let err =
        AnyScheduler::from_json(r#"{"_class_name": "DDIMScheduler", "prediction_type": "flow"}"#)
            .unwrap_err();
    assert!(err.to_string().contains("prediction_type"), "{err}");
    let err =
        AnyScheduler::from_json(r#"{"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}"#)
            .unwrap_err();
    assert!(err.to_string().contains("beta_schedule"), "{err}");
    let err = AnyScheduler::from_json(r#"{"_class_name": "UniPCMultistepScheduler"}"#).unwrap_err();
    assert!(err.to_string().contains("_class_name"), "{err}");
}

#[test]
fn ays_sigma_schedule_with_euler_gives_published_sigmas() {
    let base = SchedulerConfig::from_json(&base_config_json().to_string()).unwrap();
    let s = AnyScheduler::from_name("euler", &base)
        .unwrap()
        .with_sigmas(SigmaSchedule::AlignYourSteps(AysPreset::Sd15))
        .unwrap();
    let run = s.start(&Steps::Count(10)).unwrap();
    let want: Vec<f64> = AysPreset::Sd15
        .sigmas(10)
        .iter()
        .map(|&x| x as f32 as f64)
        .collect();
    assert_eq!(run.sigmas().unwrap(), want.as_slice());
    assert!((run.init_noise_sigma() - 14.615).abs() < 1e-5);
}

#[test]
fn zero_terminal_snr_gives_finite_schedules() {
    let mut c = SchedulerConfig::from_json(&base_config_json().to_string()).unwrap();
    c.rescale_betas_zero_snr = Some(true);
    c.timestep_spacing = Some("trailing".into());
    let raw = NoiseSchedule::from_config(&c).unwrap();
    assert_eq!(
        *raw.alphas_cumprod.last().unwrap(),
        0.0,
        "zero terminal SNR"
    );
    for name in ["ddim", "euler", "euler-a", "dpmpp-2m", "pndm"] {
        let s = AnyScheduler::from_name(name, &c).unwrap();
        let run = s.start(&Steps::Count(10)).unwrap();
        assert!(run.init_noise_sigma().is_finite(), "{name}");
        if let Some(sig) = run.sigmas() {
            assert!(sig.iter().all(|x| x.is_finite()), "{name}: {sig:?}");
        }
        assert_eq!(
            run.timestep(0).unwrap(),
            999.0,
            "{name}: trailing starts at the last timestep"
        );
    }
}

/// The extension set's trajectories (fixtures README 8d): LCM from the SD 1.5 and SDXL
/// configs at 1, 2, 4 and 8 steps (one noise draw per step but the last; the
/// `denoised` estimate checked too) and Euler ancestral with trailing spacing.
#[test]
fn lcm_and_trailing_euler_ancestral_match_diffusers() {
    let device = Device::flex();
    let mut checked = 0;
    for case in crate::common::Case::all("index_ext.json", "") {
        let (name, r, params) = (&case.name, &case.r, case.params());
        let config = SchedulerConfig::from_json(&params["resolved_config"].to_string()).unwrap();
        let scheduler = AnyScheduler::from_class(params["class"].as_str().unwrap(), &config)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for n in [1usize, 2, 4, 8, 10] {
            let p = format!("n{n}.");
            if !r.has(&format!("{p}timesteps")) {
                continue;
            }
            let run = scheduler.start(&Steps::Count(n)).unwrap();
            check_trajectory(&format!("{name} n={n}"), r, &p, run, 1e-5, &device);
            checked += 1;
        }
    }
    assert_eq!(checked, 4 + 2 + 4, "step counts checked");
}

/// TCD (`TCDScheduler`) trajectories made by `tests/fixtures/gen/ref_tcd.py`: gamma
/// 0.3 at 1, 2, 4 and 8 steps, gamma 0 and 1 at 4, the SDXL config at 4; gamma set
/// through `with_eta` as diffusers passes it to `step`.
#[test]
fn tcd_matches_diffusers() {
    let device = Device::flex();
    let mut checked = 0;
    for case in crate::common::Case::all("index_tcd.json", "") {
        let (name, r, params) = (&case.name, &case.r, case.params());
        let config = SchedulerConfig::from_json(&params["resolved_config"].to_string()).unwrap();
        let gamma = params["step_kwargs"]["eta"].as_f64().unwrap();
        let scheduler = AnyScheduler::from_class(params["class"].as_str().unwrap(), &config)
            .and_then(|s| s.with_eta(gamma))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for n in [1usize, 2, 4, 8] {
            let p = format!("n{n}.");
            if !r.has(&format!("{p}timesteps")) {
                continue;
            }
            let run = scheduler.start(&Steps::Count(n)).unwrap();
            check_trajectory(&format!("{name} n={n}"), r, &p, run, 1e-5, &device);
            checked += 1;
        }
        let mut run = scheduler.start(&Steps::Count(10)).unwrap();
        run.skip_to(4).unwrap();
        let original = r.tensor::<4>("add_noise.original", &device);
        let noise = r.tensor::<4>("add_noise.noise", &device);
        let t = r.ints("add_noise.timestep")[0] as f64;
        assert_eq!(run.timestep(4).unwrap(), t, "{name} add_noise timestep");
        tensor_close(
            &format!("{name} add_noise"),
            &run.add_noise(original, noise, 4).unwrap(),
            &r.floats("add_noise.result"),
            1e-5,
        );
    }
    assert_eq!(checked, 4 + 1 + 1 + 1, "step counts checked");
    let tcd = AnyScheduler::from_name("tcd", &SchedulerConfig::from_json("{}").unwrap()).unwrap();
    assert!(tcd.clone().with_eta(1.5).is_err(), "gamma above 1");
    assert!(
        tcd.start(&Steps::Count(51)).is_err(),
        "past the distillation grid"
    );
}

/// Flow matching (SD 3.x) made by `tests/fixtures/gen/ref_flow_match.py` over SD 3.5's
/// scheduler config: Euler at 1, 2, 4 and 28 steps, shift 1, dynamic shifting at two
/// image sizes, `shift_terminal`, `invert_sigmas`, Karras and exponential sigmas,
/// custom sigmas and timesteps, stochastic sampling; Heun; DPM++ 2M on flow sigmas;
/// and each one's `scale_noise` (img2img's noising).
#[test]
fn flow_matching_matches_diffusers() {
    let device = Device::flex();
    let mut checked = 0;
    for case in crate::common::Case::all("index_flow_match.json", "") {
        let (name, r, params) = (&case.name, &case.r, case.params());
        let config = SchedulerConfig::from_json(&params["resolved_config"].to_string()).unwrap();
        let mut scheduler = AnyScheduler::from_class(params["class"].as_str().unwrap(), &config)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(len) = params["image_seq_len"].as_u64() {
            scheduler = scheduler.with_image_seq_len(len as usize);
        }
        let floats = |key: &str| -> Option<Vec<f64>> {
            let v = params["set_timesteps_kwargs"].get(key)?.as_array()?;
            Some(v.iter().map(|x| x.as_f64().unwrap()).collect())
        };
        let steps_for = |n: usize| match (floats("sigmas"), floats("timesteps")) {
            (Some(s), _) => Steps::Sigmas(s),
            (_, Some(t)) => Steps::Timesteps(t),
            _ => Steps::Count(n),
        };
        let counts = case.entry["per_step_count"].as_object().unwrap();
        for n in counts.keys().map(|k| k.parse::<usize>().unwrap()) {
            let run = scheduler.start(&steps_for(n)).unwrap();
            check_trajectory(
                &format!("{name} n={n}"),
                r,
                &format!("n{n}."),
                run,
                1e-6,
                &device,
            );
            checked += 1;
        }
        let mut run = scheduler.start(&Steps::Count(10)).unwrap();
        run.skip_to(4).unwrap();
        let t = if r.source_dtype_is_int("add_noise.timestep") {
            r.ints("add_noise.timestep")[0] as f64
        } else {
            r.floats("add_noise.timestep")[0] as f64
        };
        let got = run.timestep(4).unwrap();
        assert!(
            (got - t).abs() <= 1e-6 * t.max(1.0),
            "{name} add_noise timestep {got} vs {t}"
        );
        tensor_close(
            &format!("{name} add_noise"),
            &run.add_noise(
                r.tensor::<4>("add_noise.original", &device),
                r.tensor::<4>("add_noise.noise", &device),
                4,
            )
            .unwrap(),
            &r.floats("add_noise.result"),
            1e-5,
        );
    }
    assert_eq!(
        checked,
        4 + 1 + 2 + 1 + 2 + 1 + 2 + 1 + 1 + 1 + 1 + 3 + 4,
        "step counts checked"
    );
}

/// Scheduler names over SD 3.5's config build the flow-matching classes; names with
/// no flow form are refused by name, as `heun` is over SD 1.5's.
#[test]
fn scheduler_names_follow_the_model_kind() {
    let sd3 = SchedulerConfig::from_json(
        &std::fs::read_to_string(common::fixture(
            "configs/sd3/sd3-scheduler/scheduler_config.json",
        ))
        .unwrap(),
    )
    .unwrap();
    for (name, class) in [
        ("euler", "FlowMatchEulerDiscreteScheduler"),
        ("Euler", "FlowMatchEulerDiscreteScheduler"),
        ("heun", "FlowMatchHeunDiscreteScheduler"),
        ("DPM++ 2M", "DPMSolverMultistepScheduler"),
    ] {
        let s = AnyScheduler::from_name(name, &sd3).unwrap();
        assert_eq!(s.class_name(), class, "{name}");
    }
    let dpm = AnyScheduler::from_name("dpmpp-2m", &sd3).unwrap();
    let run = dpm.start(&Steps::Count(4)).unwrap();
    assert_eq!(
        run.timesteps(),
        &[999.0, 899.0, 749.0, 499.0],
        "flow sigmas, shift 3"
    );
    for name in ["ddim", "euler-a", "dpmpp-2m-karras", "lcm"] {
        let err = AnyScheduler::from_name(name, &sd3).unwrap_err().to_string();
        assert!(
            err.contains("flow-matching") && err.contains("heun"),
            "{name}: {err}"
        );
    }
    let sd15 = SchedulerConfig::from_json(&base_config_json().to_string()).unwrap();
    let err = AnyScheduler::from_name("heun", &sd15)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diffusion model") && err.contains("ddim"),
        "{err}"
    );
}
