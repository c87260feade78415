//! [`Case`]: one reference case of a fixtures index (`reference/index*.json`), with
//! its recorded noise, the request its diffusers call describes, the command line an
//! example takes for it, and its assertions at a stated tolerance. Every pipeline
//! parity test runs its cases through this type.

use std::path::{Path, PathBuf};
use std::process::Command;

use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::{RecordedNoise, Steps};
use stable_diffusion::io::{WeightSource, recorded_noise_tensors};
use stable_diffusion::pipelines::{
    Generation, GenerationOptions, GenerationOutput, GenerationRequest, MicroConditioning,
    SchedulerChoice, SkipLayerGuidance, StableDiffusion, StableDiffusionPipeline,
};

use super::{Reference, fixture, max_abs_diff_values, read_index};

/// One case of an index: its entry (`file`, `params` with `call`) and its tensors.
pub struct Case {
    /// The case's key in the index (`sdxl/pipelines/txt2img_euler_7`).
    pub name: String,
    /// Its entry.
    pub entry: serde_json::Value,
    /// Its reference tensors.
    pub r: Reference,
}

/// Largest `|a - b|`, and the scale it is measured against (the reference's largest
/// magnitude, at least 1).
pub fn rel_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    (max_abs_diff_values(got, want), scale)
}

/// Asserts `max |a - b| <= tol * scale` ([`rel_diff`]), printing the figure; returns
/// the relative difference.
pub fn assert_rel_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    let (d, scale) = rel_diff(got, want);
    eprintln!(
        "{what}: max abs diff {d:.3e} (scale {scale:.3}, allowed {:.1e})",
        tol * scale
    );
    assert!(d <= tol * scale, "{what}: max diff {d} > {}", tol * scale);
    d / scale
}

/// A tensor's values on the host.
pub fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn pair(v: &serde_json::Value) -> Option<(usize, usize)> {
    let a = v.as_array()?;
    Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize))
}

impl Case {
    /// Case `name` of `reference/{index}`.
    pub fn open(index: &str, name: &str) -> Self {
        let doc = read_index(index);
        let entry = doc["cases"][name].clone();
        assert!(entry.is_object(), "{index} has no case {name}");
        Self::from_entry(name, entry)
    }

    /// Every case of `reference/{index}` whose name starts with `prefix`, in the
    /// index's order.
    pub fn all(index: &str, prefix: &str) -> Vec<Self> {
        let doc = read_index(index);
        doc["cases"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, entry)| Self::from_entry(name, entry.clone()))
            .collect()
    }

    fn from_entry(name: &str, entry: serde_json::Value) -> Self {
        let r = Reference::open(&format!("reference/{}", entry["file"].as_str().unwrap()));
        Self {
            name: name.to_string(),
            entry,
            r,
        }
    }

    /// The case's parameters.
    pub fn params(&self) -> &serde_json::Value {
        &self.entry["params"]
    }

    /// The diffusers call's arguments.
    pub fn call(&self) -> &serde_json::Value {
        &self.entry["params"]["call"]
    }

    /// A text argument of the call, or of the parameters (cases whose embeddings
    /// were made outside diffusers keep their prompts there).
    pub fn text(&self, key: &str) -> Option<&str> {
        self.call()[key].as_str().or(self.params()[key].as_str())
    }

    /// The pipeline class the reference ran.
    pub fn pipeline(&self) -> &str {
        self.params()["pipeline"].as_str().unwrap_or_default()
    }

    /// The scheduler's `scheduler_config.json` text.
    pub fn scheduler_config(&self) -> String {
        self.params()["scheduler_config"].to_string()
    }

    /// The steps the call asks for: timesteps, sigmas or a count.
    pub fn steps(&self) -> Steps {
        let list = |k: &str| {
            self.call()[k]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>())
        };
        if let Some(t) = list("timesteps") {
            Steps::Timesteps(t)
        } else if let Some(s) = list("sigmas") {
            Steps::Sigmas(s)
        } else {
            Steps::Count(self.call()["num_inference_steps"].as_u64().unwrap() as usize)
        }
    }

    /// The picture's `(width, height)`: the call's, else 32x32.
    pub fn size(&self) -> (usize, usize) {
        let side = |k: &str| self.call()[k].as_u64().map_or(32, |v| v as usize);
        (side("width"), side("height"))
    }

    /// The call's guidance scale (diffusers' default 7.5).
    pub fn guidance(&self) -> f64 {
        self.call()["guidance_scale"].as_f64().unwrap_or(7.5)
    }

    /// The call's skip-layer guidance (`skip_guidance_layers` and the
    /// `skip_layer_guidance_*` values, diffusers' defaults where unset).
    pub fn skip_layer_guidance(&self) -> Option<SkipLayerGuidance> {
        let c = self.call();
        let layers = c["skip_guidance_layers"].as_array()?;
        Some(SkipLayerGuidance::with_settings(
            layers
                .iter()
                .map(|l| l.as_u64().unwrap() as usize)
                .collect(),
            c["skip_layer_guidance_scale"].as_f64(),
            c["skip_layer_guidance_start"].as_f64(),
            c["skip_layer_guidance_stop"].as_f64(),
        ))
    }

    /// The call's `clip_skip`.
    pub fn clip_skip(&self) -> Option<usize> {
        self.call()["clip_skip"].as_u64().map(|c| c as usize)
    }

    /// The recorded noise draws, to replay.
    pub fn noise(&self, device: &Device) -> RecordedNoise {
        RecordedNoise::new(self.noise_tensors(device))
    }

    /// How many draws were recorded.
    pub fn noise_count(&self) -> usize {
        (0..)
            .take_while(|&i| self.r.has(&stable_diffusion::io::noise::noise_key(i)))
            .count()
    }

    fn noise_tensors(&self, device: &Device) -> Vec<Tensor<4>> {
        let source = WeightSource::open(self.path()).unwrap();
        recorded_noise_tensors(&source, device).unwrap()
    }

    /// The control image of a ControlNet or adapter case (`params.control_png`: one
    /// file, or the `k`-th of a list).
    pub fn control_png(&self, k: usize) -> PathBuf {
        let v = &self.params()["control_png"];
        let rel = v.as_str().or_else(|| v[k].as_str()).unwrap();
        fixture(&format!("reference/{rel}"))
    }

    /// The reference file.
    pub fn path(&self) -> PathBuf {
        fixture(&format!(
            "reference/{}",
            self.entry["file"].as_str().unwrap()
        ))
    }

    /// SDXL's micro-conditioning of the call.
    pub fn micro(&self) -> MicroConditioning {
        let c = self.call();
        MicroConditioning {
            original_size: pair(&c["original_size"]),
            crops_coords_top_left: pair(&c["crops_coords_top_left"]).unwrap_or((0, 0)),
            target_size: pair(&c["target_size"]),
            negative_original_size: pair(&c["negative_original_size"]),
            negative_crops_coords_top_left: pair(&c["negative_crops_coords_top_left"])
                .unwrap_or((0, 0)),
            negative_target_size: pair(&c["negative_target_size"]),
            ..Default::default()
        }
    }

    /// The options of the borrowing composition ([`stable_diffusion::pipelines::StableDiffusion`]):
    /// prompts, steps, guidance, size, clip skip, initial latents.
    pub fn options(&self, device: &Device) -> GenerationOptions {
        let (width, height) = self.size();
        GenerationOptions {
            prompt: self.text("prompt").unwrap_or_default().into(),
            negative_prompt: self.text("negative_prompt").map(String::from),
            prompt_2: self.text("prompt_2").map(String::from),
            negative_prompt_2: self.text("negative_prompt_2").map(String::from),
            prompt_3: self.text("prompt_3").map(String::from),
            negative_prompt_3: self.text("negative_prompt_3").map(String::from),
            max_sequence_length: self.call()["max_sequence_length"]
                .as_u64()
                .map(|v| v as usize),
            skip_layer_guidance: self.skip_layer_guidance(),
            steps: self.steps(),
            guidance_scale: self.guidance(),
            width,
            height,
            clip_skip: self.clip_skip(),
            init_latents: self
                .r
                .has("init_latents")
                .then(|| self.r.tensor::<4>("init_latents", device)),
            long_prompts: self.params()["long_prompts"].as_bool().unwrap_or(false),
            prompt_weighting: self.params()["prompt_weighting"].as_bool().unwrap_or(false),
            micro: self.micro(),
            ..Default::default()
        }
    }

    /// The owning pipeline's request the call describes, with the recorded noise:
    /// prompts, size, steps, guidance, scheduler config, clip skip, micro-conditioning,
    /// the hand-over's `denoising_start`, the input image (and mask) and the initial
    /// latents where the reference has them.
    pub fn request(&self, device: &Device) -> GenerationRequest<'static> {
        let (width, height) = self.size();
        self.request_sized_by_inputs(device).size(width, height)
    }

    /// [`Self::request`] without an explicit size, for runs whose inputs (an init
    /// image, control images) set it.
    pub fn request_sized_by_inputs(&self, device: &Device) -> GenerationRequest<'static> {
        let o = self.options(device);
        let mut req = GenerationRequest::new(o.prompt)
            .long_prompts(o.long_prompts)
            .prompt_weighting(o.prompt_weighting)
            .guidance(o.guidance_scale)
            .schedule(o.steps)
            .scheduler_choice(SchedulerChoice::Config(self.scheduler_config()))
            .micro_conditioning(o.micro)
            .noise(self.noise(device));
        let texts = [
            (
                o.negative_prompt,
                GenerationRequest::negative_prompt as fn(_, String) -> _,
            ),
            (o.prompt_2, GenerationRequest::prompt_2),
            (o.negative_prompt_2, GenerationRequest::negative_prompt_2),
            (o.prompt_3, GenerationRequest::prompt_3),
            (o.negative_prompt_3, GenerationRequest::negative_prompt_3),
        ];
        for (text, set) in texts {
            if let Some(t) = text {
                req = set(req, t);
            }
        }
        if let Some(k) = o.clip_skip {
            req = req.clip_skip(k);
        }
        if let Some(n) = o.max_sequence_length {
            req = req.max_sequence_length(n);
        }
        if let Some(slg) = o.skip_layer_guidance {
            req = req.skip_layer_guidance(slg);
        }
        if let Some(start) = self.call()["denoising_start"].as_f64() {
            req = req.denoising_start(start);
        }
        if self.r.has("input_image_preprocessed") {
            let strength = self.call()["strength"].as_f64().unwrap_or(1.0);
            req = req.init_image(
                self.r.tensor::<4>("input_image_preprocessed", device),
                strength,
            );
            if self.r.has("mask_preprocessed") {
                req = req.mask(self.r.tensor::<4>("mask_preprocessed", device));
            }
        }
        // Text to image's initial latents, or inpainting's at strength 1.
        if let Some(latents) = o.init_latents {
            req = req.init_latents(latents);
        }
        req
    }

    /// Runs the case's request, changed by `adjust` (LoRAs, control inputs, ...),
    /// through the owning pipeline.
    pub fn generate(
        &self,
        pipe: &StableDiffusionPipeline,
        adjust: impl FnOnce(GenerationRequest<'static>) -> GenerationRequest<'static>,
    ) -> Generation {
        pipe.generate(adjust(self.request(pipe.device())))
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Runs the case through the borrowing composition `sd` (its scheduler and
    /// control units set by the caller) as the reference's pipeline class does
    /// (text to image, image to image, inpainting), with the recorded noise, every
    /// draw of which it asserts was used.
    pub fn run_composed(&self, sd: &StableDiffusion<'_>, device: &Device) -> GenerationOutput {
        let options = self.options(device);
        let mut noise = self.noise(device);
        let image = || self.r.tensor::<4>("input_image_preprocessed", device);
        let strength = self.call()["strength"].as_f64().unwrap_or(1.0);
        let out = if self.r.has("mask_preprocessed") {
            let mask = self.r.tensor::<4>("mask_preprocessed", device);
            sd.inpaint(&options, image(), mask, strength, &mut noise, None)
        } else if self.r.has("input_image_preprocessed") {
            sd.img2img(&options, image(), strength, &mut noise, None)
        } else {
            sd.txt2img(&options, &mut noise, None)
        }
        .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        assert_eq!(
            noise.remaining(),
            0,
            "{}: every recorded noise used",
            self.name
        );
        out
    }

    /// The final latents' largest difference relative to their largest magnitude.
    pub fn latents_error(&self, got: &Tensor<4>) -> f32 {
        let (d, scale) = rel_diff(&values(got), &self.r.floats("final_latents"));
        d / scale
    }

    /// Asserts the final latents within `tol` of their largest magnitude.
    pub fn check_latents(&self, got: &Tensor<4>, tol: f32) -> f32 {
        self.check_latent_values(&values(got), tol)
    }

    /// As [`Self::check_latents`] over host values.
    pub fn check_latent_values(&self, got: &[f32], tol: f32) -> f32 {
        let what = format!("{} final latents", self.name);
        assert_rel_close(&what, got, &self.r.floats("final_latents"), tol)
    }

    /// Asserts an 8-bit RGB picture within `levels` of the reference's `image`
    /// (`[1, H, W, 3]` in `[0, 1]`).
    pub fn check_image(&self, got: &[u8], levels: f32) {
        let want = self.r.floats("image");
        assert_eq!(got.len(), want.len(), "{}: picture size", self.name);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f32 - b * 255.0).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{}: picture max diff {worst:.2} / 255", self.name);
        assert!(
            worst <= levels,
            "{}: picture differs by {worst} / 255",
            self.name
        );
    }

    /// An example's command for the case: the model, prompts, steps, guidance,
    /// size and scheduler (`scheduler` by name, else the case's config) of the call,
    /// the initial latents and recorded noise (written under `dir`), the picture to
    /// `dir/out.png` and the latents to [`Self::saved_latents`].
    pub fn example_command(
        &self,
        exe: &Path,
        model: &Path,
        dir: &Path,
        scheduler: Option<&str>,
    ) -> Command {
        let mut cmd = Command::new(exe);
        cmd.args(["--model", model.to_str().unwrap()]);
        let flags = [
            ("prompt", "--prompt"),
            ("negative_prompt", "--negative-prompt"),
            ("prompt_2", "--prompt-2"),
            ("negative_prompt_2", "--negative-prompt-2"),
            ("prompt_3", "--prompt-3"),
            ("negative_prompt_3", "--negative-prompt-3"),
        ];
        for (key, flag) in flags {
            if let Some(t) = self.text(key) {
                cmd.args([flag, t]);
            }
        }
        if let Some(k) = self.clip_skip() {
            cmd.args(["--clip-skip", &k.to_string()]);
        }
        if let Some(n) = self.call()["max_sequence_length"].as_u64() {
            cmd.args(["--max-sequence-length", &n.to_string()]);
        }
        if let Some(slg) = self.skip_layer_guidance() {
            let layers: Vec<String> = slg.layers.iter().map(|l| l.to_string()).collect();
            cmd.args(["--skip-layer-guidance", &layers.join(",")]);
            for (flag, v) in [
                ("--slg-scale", slg.scale),
                ("--slg-start", slg.start),
                ("--slg-stop", slg.stop),
            ] {
                cmd.args([flag, &v.to_string()]);
            }
        }
        let (w, h) = self.size();
        let Steps::Count(steps) = self.steps() else {
            panic!("{}: the examples take a step count", self.name);
        };
        for (flag, v) in [
            ("--steps", steps.to_string()),
            ("--guidance", self.guidance().to_string()),
            ("--width", w.to_string()),
            ("--height", h.to_string()),
        ] {
            cmd.args([flag, &v]);
        }
        match scheduler {
            Some(name) => {
                cmd.args(["--scheduler", name]);
            }
            None => {
                let sched = dir.join("scheduler_config.json");
                std::fs::write(&sched, self.scheduler_config()).unwrap();
                cmd.arg("--scheduler-config").arg(&sched);
            }
        }
        let copy = |keys: &[&str], file: &str, rename: Option<&str>| {
            let tensors: Vec<_> = keys
                .iter()
                .map(|k| {
                    let name = rename.unwrap_or(k).to_string();
                    (name, self.r.floats(k), self.r.shape(k))
                })
                .collect();
            let path = dir.join(file);
            write_tensors(&path, &tensors);
            path
        };
        let noise: Vec<String> = (0..self.noise_count())
            .map(stable_diffusion::io::noise::noise_key)
            .collect();
        if !noise.is_empty() {
            let keys: Vec<&str> = noise.iter().map(String::as_str).collect();
            cmd.arg("--noise")
                .arg(copy(&keys, "noise.safetensors", None));
        }
        if self.r.has("init_latents") {
            let path = copy(&["init_latents"], "init.safetensors", Some("latents"));
            cmd.arg("--init-latents").arg(path);
        }
        cmd.arg("--out").arg(dir.join("out.png"));
        cmd.arg("--save-latents").arg(Self::saved_latents(dir));
        cmd
    }

    /// Where [`Self::example_command`] has the example save its latents.
    pub fn saved_latents(dir: &Path) -> PathBuf {
        dir.join("latents.safetensors")
    }

    /// Runs `cmd`, asserts it succeeded, and checks the latents it saved under `dir`
    /// within `tol` ([`Self::check_latents`]).
    pub fn check_example(&self, mut cmd: Command, dir: &Path, tol: f32) -> f32 {
        let output = cmd.output().unwrap();
        assert!(
            output.status.success(),
            "{} through the example failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let saved = WeightSource::open(Self::saved_latents(dir)).unwrap();
        let shape = saved.get("latents").unwrap().shape.clone();
        let got = saved
            .read_float("latents", stable_diffusion::burn::tensor::DType::F32, shape)
            .unwrap()
            .try_to_vec::<f32>()
            .unwrap();
        self.check_latent_values(&got, tol)
    }
}

/// Writes f32 tensors `(name, values, shape)` to a safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<f32>, Vec<usize>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _, shape), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b);
            (name.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}
