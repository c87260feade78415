//! The training loop: full fine-tuning or LoRA of a diffusers model's U-Net (SD 1.x,
//! SD 2.x or SDXL) on an image-caption folder, with checkpoints in the diffusers layout
//! and resumable runs.
//!
//! What a run writes under `output`:
//! - `log.csv` (see [`crate::monitor::CsvLog`]) and `loss.png`, redrawn at each log row;
//! - `samples/step-NNNNNN.png`: a grid of the sample prompts, fixed seeds;
//! - `checkpoint-N/`: `unet/` (full) or `pytorch_lora_weights.safetensors` (LoRA),
//!   `ema_unet/` with EMA, `optimizer.bpk` and `trainer_state.json`; a run started
//!   again with the same `output` resumes from the last one;
//! - at the end, a complete diffusers pipeline folder `output/model/` (full
//!   fine-tuning; the U-Net is the EMA one when EMA is on), the LoRA as
//!   `pytorch_lora_weights.safetensors` (diffusers layout) and
//!   `lora_kohya.safetensors` (kohya layout), or the ControlNet as
//!   `output/controlnet/` (ControlNet training; `controlnet/` in checkpoints).
//!
//! Data order, timesteps and noise are drawn from generators seeded by `seed` and
//! the step, so a resumed run continues exactly as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use sd_core::{NoiseRng, Steps};
use sd_io::{ComponentOptions, DiffusersDir};
use sd_models::{
    AutoencoderKL, ClipTextModel, ControlNetConfig, UNet2DConditionConfig, UNet2DConditionModel,
};
use sd_pipelines::{ControlNetUnit, GenerationOptions, StableDiffusion};
use sd_schedulers::{AnyScheduler, PredictionType, SchedulerConfig};
use serde::{Deserialize, Serialize};

use crate::conditioning::{CaptionEncoder, Conditioning};
use crate::controlnet::{ControlNetTrainConfig, controlled_prediction};
use crate::data::{Example, load_training_image_with_sizes, read_folder};
use crate::error::TrainError;
use crate::monitor::{CsvLog, LogRow, image_grid, write_loss_plot};
use crate::objective::Objective;
use crate::optim::{Ema, clip_grad_norm};
use crate::trained::{TrainedModels, controlnet_config};

pub use crate::config::{LoraTrainConfig, TrainConfig};

/// What `trainer_state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// EMA updates done.
    pub ema_step: usize,
    /// The config of the run.
    pub config: TrainConfig,
}

/// Progress reported after each optimizer step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The step's log row (`val_loss` set when measured).
    pub row: LogRow,
    /// The run's total steps.
    pub max_steps: usize,
    /// A file written at this step (checkpoint, samples), if any.
    pub wrote: Option<PathBuf>,
}

/// A prepared training example.
struct Item {
    /// VAE moments `[1, 2c, h, w]` (cached latents), or the image `[1, 3, H, W]`.
    pixels_or_moments: Tensor<4>,
    /// The caption's conditioning (SDXL: with the picture's time ids).
    cond: Conditioning,
    /// The caption, encoded at every step when the text encoders train.
    caption: String,
    /// ControlNet training: the control image `[1, 3, H, W]` in `[0, 1]`.
    control: Option<Tensor<4>>,
}

/// A training run over loaded models.
pub struct Trainer {
    config: TrainConfig,
    device: Device,
    vae: AutoencoderKL,
    scaling_factor: f64,
    captions: CaptionEncoder,
    scheduler_config: SchedulerConfig,
    unet_config: UNet2DConditionConfig,
    /// ControlNet training: the trained ControlNet's config.
    controlnet_config: Option<ControlNetConfig>,
    objective: Objective,
    train: Vec<Item>,
    validation: Vec<Item>,
    class: Vec<Item>,
    /// The empty prompt's conditioning, when caption dropout is on.
    empty_embedding: Option<Conditioning>,
    /// The examples used, training then validation.
    pub examples: Vec<Example>,
}

fn latest_checkpoint(output: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(output)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(to).map_err(|e| TrainError::file(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| TrainError::file(from, e))? {
        let entry = entry.map_err(|e| TrainError::file(from, e))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| TrainError::file(&target, e))?;
        }
    }
    Ok(())
}

impl Trainer {
    /// Loads the frozen parts (VAE, text encoder(s), tokenizer(s), scheduler config) of
    /// `config.model` on `device`, reads the data set and prepares every example
    /// (prompt embeddings, and SDXL's pooled embeddings and time ids, always cached;
    /// latents with `cache_latents`).
    pub fn new(config: TrainConfig, device: Device) -> Result<Self, TrainError> {
        config.validate()?;
        let dir = DiffusersDir::open(&config.model)?;
        let options = ComponentOptions::default();
        let device = device.without_autodiff();
        let vae = dir.vae(&device, &options)?;
        let scaling_factor = dir.vae_config()?.scaling_factor;
        let captions = CaptionEncoder::from_dir(&dir, &device)?;
        let mut scheduler_config = SchedulerConfig::from_json(&dir.scheduler_config_text()?)?;
        if let Some(p) = &config.prediction_type {
            scheduler_config.prediction_type = Some(p.clone());
        }
        let unet_config = dir.unet_config()?;
        let controlnet_config = match &config.controlnet {
            Some(c) => Some(controlnet_config(c, &unet_config)?),
            None => None,
        };
        let mut objective = Objective::from_config(&scheduler_config)?;
        objective.snr_gamma = config.snr_gamma;
        let examples = read_folder(&config.data, config.default_caption.as_deref())?;
        if config.validation_images >= examples.len() {
            return Err(TrainError::Data {
                path: config.data.clone(),
                message: format!(
                    "{} images, {} held out for validation: none left to train on",
                    examples.len(),
                    config.validation_images
                ),
            });
        }
        let empty_embedding = match config.caption_dropout > 0.0 {
            true => Some(captions.encode("", &device)?),
            false => None,
        };
        let mut trainer = Self {
            empty_embedding,
            config,
            device,
            vae,
            scaling_factor,
            captions,
            scheduler_config,
            unet_config,
            controlnet_config,
            objective,
            train: Vec::new(),
            validation: Vec::new(),
            class: Vec::new(),
            examples,
        };
        let n_val = trainer.config.validation_images;
        let n_train = trainer.examples.len() - n_val;
        for (i, ex) in trainer.examples.clone().iter().enumerate() {
            let flips: &[bool] = if trainer.config.random_flip && i < n_train {
                &[false, true]
            } else {
                &[false]
            };
            for &flip in flips {
                let item = trainer.prepare(ex, flip)?;
                if i < n_train {
                    trainer.train.push(item);
                } else {
                    trainer.validation.push(item);
                }
            }
        }
        if let (Some(dir), Some(prompt)) =
            (&trainer.config.class_data, &trainer.config.class_prompt)
        {
            trainer.generate_class_images(dir, prompt)?;
            for ex in read_folder(dir, Some(prompt))? {
                let item = trainer.prepare(&ex, false)?;
                trainer.class.push(item);
            }
        }
        Ok(trainer)
    }

    /// Fills `dir` with generated images of `prompt` up to `num_class_images`
    /// (`class-NNNN.png` + `.txt`), with the base model and the sample settings.
    fn generate_class_images(&self, dir: &Path, prompt: &str) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
        let have = read_folder(dir, Some(prompt)).map(|v| v.len()).unwrap_or(0);
        if have >= self.config.num_class_images {
            return Ok(());
        }
        let unet = DiffusersDir::open(&self.config.model)?
            .unet(&self.device, &ComponentOptions::default())?;
        for i in have..self.config.num_class_images {
            let seed = self.config.seed.wrapping_add(0xC1A55 + i as u64);
            let images = self.generate(&unet, &[], None, &[(prompt, seed)])?;
            let (w, h, rgb) = sd_io::image::to_rgb8(&images, 0);
            let path = dir.join(format!("class-{i:04}.png"));
            sd_io::image::write_png_rgb8(&path, w, h, &rgb, None)?;
            let txt = path.with_extension("txt");
            std::fs::write(&txt, prompt).map_err(|e| TrainError::file(&txt, e))?;
        }
        Ok(())
    }

    /// One image per `(prompt, seed)` with `unet` and `text_encoders` (off autodiff;
    /// none: the frozen ones) and the sample settings, `[n, 3, resolution,
    /// resolution]` in `[0, 1]`.
    fn generate(
        &self,
        unet: &UNet2DConditionModel,
        text_encoders: &[ClipTextModel],
        controlnet: Option<&sd_models::ControlNetModel>,
        prompts: &[(&str, u64)],
    ) -> Result<Tensor<4>, TrainError> {
        let scheduler = AnyScheduler::from_config(&self.scheduler_config)?;
        // A trained ControlNet draws from the first training picture's control image.
        let control = self.train.first().and_then(|i| i.control.clone());
        let controlnets = match (controlnet, control) {
            (Some(model), Some(image)) => vec![ControlNetUnit::new(model, image)],
            _ => Vec::new(),
        };
        let sd = StableDiffusion {
            conditioner: self.captions.conditioner(text_encoders),
            unet,
            vae: &self.vae,
            decoder: None,
            preview_decoder: None,
            watermark: None,
            scheduler: &scheduler,
            controlnets,
            adapters: Vec::new(),
            device: self.device.clone(),
        };
        let mut images = Vec::with_capacity(prompts.len());
        for &(prompt, seed) in prompts {
            let options = GenerationOptions {
                prompt: prompt.to_string(),
                steps: Steps::Count(self.config.sample_steps),
                guidance_scale: self.config.sample_guidance,
                width: self.config.resolution,
                height: self.config.resolution,
                ..Default::default()
            };
            images.push(
                sd.txt2img(&options, &mut NoiseRng::seed(seed), None)?
                    .images,
            );
        }
        Ok(Tensor::cat(images, 0))
    }

    fn prepare(&self, ex: &Example, flip: bool) -> Result<Item, TrainError> {
        let r = self.config.resolution;
        let image = load_training_image_with_sizes(
            &ex.image,
            r,
            self.config.center_crop,
            flip,
            &self.device,
        )?;
        let pixels_or_moments = if self.config.cache_latents {
            self.vae.encode_moments(image.pixels)
        } else {
            image.pixels
        };
        let cond = self
            .captions
            .encode(&ex.caption, &self.device)?
            .with_time_ids(image.original_size, image.crop_top_left, (r, r));
        let control = match &self.config.controlnet {
            Some(c) => Some(self.control_image(c, ex, flip)?),
            None => None,
        };
        Ok(Item {
            pixels_or_moments,
            cond,
            caption: ex.caption.clone(),
            control,
        })
    }

    /// The control image of `ex` (same file name in the conditioning folder), resized,
    /// cropped and flipped as the picture, in `[0, 1]`.
    fn control_image(
        &self,
        c: &ControlNetTrainConfig,
        ex: &Example,
        flip: bool,
    ) -> Result<Tensor<4>, TrainError> {
        let dir = c
            .conditioning_data
            .clone()
            .unwrap_or_else(|| self.config.data.join("conditioning"));
        let name = ex.image.file_name().unwrap_or_default();
        let path = dir.join(name);
        if !path.is_file() {
            return Err(TrainError::Data {
                path: ex.image.clone(),
                message: format!("no control image {}", path.display()),
            });
        }
        let image = load_training_image_with_sizes(
            &path,
            self.config.resolution,
            self.config.center_crop,
            flip,
            &self.device,
        )?;
        Ok((image.pixels + 1.0) / 2.0)
    }

    /// The conditioning of a training row: `item`'s (or the empty caption's with
    /// `dropped`), encoded again by `models`' text encoders when they train.
    fn row_conditioning(
        &self,
        models: &TrainedModels,
        item: &Item,
        dropped: bool,
    ) -> Result<Conditioning, TrainError> {
        let cached = match (&self.empty_embedding, dropped) {
            (Some(e), true) => e,
            _ => &item.cond,
        };
        if models.text_encoders.is_empty() {
            return Ok(Conditioning {
                time_ids: item.cond.time_ids.clone(),
                ..cached.clone()
            });
        }
        let caption = if dropped { "" } else { &item.caption };
        let cond = self
            .captions
            .encode_with(caption, &models.text_encoders, &self.device)?;
        Ok(Conditioning {
            time_ids: item.cond.time_ids.clone(),
            ..cond
        })
    }

    /// What the trainer prepared for training example `i` (flipped copies count):
    /// the conditioning and, with `cache_latents`, the VAE moments `[1, 2c, h, w]`
    /// (else the picture `[1, 3, H, W]` in `[-1, 1]`).
    pub fn prepared(&self, i: usize) -> Option<(Conditioning, Tensor<4>)> {
        self.train
            .get(i)
            .map(|item| (item.cond.clone(), item.pixels_or_moments.clone()))
    }

    /// The U-Net's prediction for noisy latents under `rows`' conditioning, with the
    /// trained ControlNet's residuals of `control` (`[n, 3, H, W]`) when there is one.
    fn predict(
        models: &TrainedModels,
        noisy: Tensor<4>,
        t: Tensor<1>,
        rows: &[Conditioning],
        control: Option<Tensor<4>>,
    ) -> Tensor<4> {
        let (context, added) = Conditioning::batch(rows);
        match (&models.controlnet, control) {
            (Some(cn), Some(control)) => {
                controlled_prediction(&models.unet, cn, noisy, t, context, added, control)
            }
            _ => models
                .unet
                .forward_added_with_intermediates(noisy, t, context, &added, |_, _| {}),
        }
    }

    /// Latents `scaling_factor * (mean + std * eps)` of an item.
    fn latents(&self, item: &Item, rng: &mut StdRng) -> Tensor<4> {
        let moments = if self.config.cache_latents {
            item.pixels_or_moments.clone()
        } else {
            self.vae.encode_moments(item.pixels_or_moments.clone())
        };
        let [b, c2, h, w] = moments.dims();
        let c = c2 / 2;
        let mut parts = moments.split(c, 1);
        let logvar = parts.pop().unwrap().clamp(-30.0, 20.0);
        let mean = parts.pop().unwrap();
        let eps = gaussian([b, c, h, w], rng, &self.device);
        (mean + logvar.mul_scalar(0.5).exp() * eps).mul_scalar(self.scaling_factor)
    }

    /// The models to train: `config.model`'s, LoRA factors attached when asked, on the
    /// autodiff version of the device; `weights` resumes from a checkpoint.
    fn trainable(&self, weights: Option<&Path>) -> Result<TrainedModels, TrainError> {
        self.load_models(weights, &self.device.clone().autodiff())
    }

    fn load_models(
        &self,
        weights: Option<&Path>,
        device: &Device,
    ) -> Result<TrainedModels, TrainError> {
        let c = &self.config;
        match &c.controlnet {
            Some(cn) => TrainedModels::load_controlnet(&c.model, cn, weights, device),
            None => TrainedModels::load(&c.model, c.lora.as_ref(), weights, device),
        }
    }

    /// The mean loss over the validation images at timesteps 100, 300, 500, 700 and 900
    /// with fixed noise, so values are comparable across the run.
    pub fn validation_loss(&self, models: &TrainedModels) -> Option<f64> {
        if self.validation.is_empty() {
            return None;
        }
        let models = models.valid();
        let mut total = 0.0;
        let mut n = 0;
        for (i, item) in self.validation.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(0x5eed_0000 + i as u64);
            let x0 = self.latents(item, &mut rng);
            let ts = [100, 300, 500, 700, 900]
                .map(|t: usize| t.min(self.objective.num_train_timesteps() - 1));
            for t in ts {
                let noise = gaussian(x0.dims(), &mut rng, &self.device);
                let noisy = self.objective.add_noise(x0.clone(), noise.clone(), &[t]);
                let target = self.objective.target(x0.clone(), noise, &[t]);
                let tt = Tensor::<1>::from_floats([t as f32], &self.device);
                let cond = self.row_conditioning(&models, item, false).ok()?;
                let pred = Self::predict(&models, noisy, tt, &[cond], item.control.clone());
                total += self.objective.loss(pred, target, &[t]).into_scalar::<f32>() as f64;
                n += 1;
            }
        }
        Some(total / n as f64)
    }

    /// A grid of the sample prompts, one seed each (0, 1, ...).
    pub fn sample_grid(&self, models: &TrainedModels, path: &Path) -> Result<(), TrainError> {
        if self.config.sample_prompts.is_empty() {
            return Ok(());
        }
        let prompts: Vec<(&str, u64)> = (self.config.sample_prompts.iter())
            .enumerate()
            .map(|(i, p)| (p.as_str(), i as u64))
            .collect();
        let models = models.valid();
        let grid = self.generate(
            &models.unet,
            &models.text_encoders,
            models.controlnet.as_ref(),
            &prompts,
        )?;
        let n = prompts.len();
        let columns = (n as f64).sqrt().ceil() as usize;
        let (w, h, rgb) = image_grid(&grid, columns);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
        }
        sd_io::image::write_png_rgb8(path, w, h, &rgb, None)?;
        Ok(())
    }

    /// Runs (or resumes) the training, calling `on_step` after each optimizer step;
    /// returns the trained models (the EMA ones when EMA is on).
    pub fn run(&self, mut on_step: impl FnMut(&Progress)) -> Result<TrainedModels, TrainError> {
        let c = &self.config;
        let out = &c.output;
        std::fs::create_dir_all(out).map_err(|e| TrainError::file(out, e))?;
        let resume = latest_checkpoint(out);
        let mut optim = AdamWConfig::new()
            .with_beta_1(c.adam_beta1 as f32)
            .with_beta_2(c.adam_beta2 as f32)
            .with_epsilon(c.adam_epsilon as f32)
            .with_weight_decay(c.weight_decay as f32)
            .init();
        let (mut models, mut ema, start) = match &resume {
            None => {
                let models = self.trainable(None)?;
                let ema = c.ema_decay.map(|d| Ema::new(&models, d));
                (models, ema, 0)
            }
            Some((step, dir)) => {
                let models = self.trainable(Some(&dir.join(self.weights_name(false))))?;
                let state_path = dir.join("trainer_state.json");
                let text = std::fs::read_to_string(&state_path)
                    .map_err(|e| TrainError::file(&state_path, e))?;
                let state: TrainerState =
                    serde_json::from_str(&text).map_err(|e| TrainError::file(&state_path, e))?;
                let opt_path = dir.join("optimizer.bpk");
                optim = optim
                    .load(&opt_path)
                    .map_err(|e| TrainError::file(&opt_path, format!("{e:?}")))?;
                let ema = match c.ema_decay {
                    None => None,
                    Some(d) => {
                        let weights = dir.join(self.weights_name(true));
                        let model = self.load_models(Some(&weights), &self.device)?;
                        Some(Ema {
                            model,
                            decay: d,
                            step: state.ema_step,
                        })
                    }
                };
                (models, ema, *step)
            }
        };
        let mut log = CsvLog::open(out.join("log.csv"), start)?;
        let micro = c.batch_size;
        let mut last_time = Instant::now();
        let mut last_step = start;
        let mut train_order = EpochOrder::new(c.seed, self.train.len());
        let mut class_order = EpochOrder::new(c.seed.wrapping_add(0xC1A55), self.class.len());
        for step in start..c.max_steps {
            let mut rng = StdRng::seed_from_u64(
                c.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let mut accumulator = GradientsAccumulator::<TrainedModels>::new();
            let mut loss_sum = 0.0;
            let mut epoch = 0;
            for m in 0..c.gradient_accumulation {
                let first = (step * c.gradient_accumulation + m) * micro;
                let (loss, last_epoch) = self.micro_batch_loss(
                    &models,
                    first,
                    &mut rng,
                    &mut train_order,
                    &mut class_order,
                )?;
                epoch = last_epoch;
                loss_sum += loss.clone().into_scalar::<f32>() as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &models);
                accumulator.accumulate(&models, grads);
            }
            let (grads, grad_norm) = clip_grad_norm(&models, accumulator.grads(), c.max_grad_norm);
            let lr = c.learning_rate * c.lr_schedule.factor(step);
            models = optim.step(lr, models, grads);
            if let Some(ema) = ema.as_mut() {
                ema.update(&models);
            }
            let done = step + 1;
            let mut wrote = None;
            let val_loss = if c.validation_images > 0
                && (done % c.validation_every == 0 || done == c.max_steps)
            {
                self.validation_loss(ema.as_ref().map(|e| &e.model).unwrap_or(&models))
            } else {
                None
            };
            let elapsed = last_time.elapsed().as_secs_f64();
            let row = LogRow {
                step: done,
                epoch,
                loss: loss_sum,
                lr,
                grad_norm,
                steps_per_s: (done - last_step) as f64 / elapsed.max(1e-9),
                val_loss,
            };
            if done % c.log_every == 0 || val_loss.is_some() || done == c.max_steps {
                log.append(&row)?;
                write_loss_plot(&out.join("loss.png"), log.rows())?;
                last_time = Instant::now();
                last_step = done;
            }
            if !c.sample_prompts.is_empty() && (done % c.sample_every == 0 || done == c.max_steps) {
                let path = out.join("samples").join(format!("step-{done:06}.png"));
                self.sample_grid(ema.as_ref().map(|e| &e.model).unwrap_or(&models), &path)?;
                wrote = Some(path);
            }
            if done % c.checkpoint_every == 0 || done == c.max_steps {
                let dir = out.join(format!("checkpoint-{done}"));
                self.write_checkpoint(&dir, &models, ema.as_ref(), done)?;
                let opt_path = dir.join("optimizer.bpk");
                optim
                    .save(&opt_path)
                    .map_err(|e| TrainError::file(&opt_path, format!("{e:?}")))?;
                wrote = Some(dir);
            }
            on_step(&Progress {
                row,
                max_steps: c.max_steps,
                wrote,
            });
        }
        let result = match ema {
            Some(e) => e.model,
            None => models.valid(),
        };
        self.export(&result)?;
        Ok(result)
    }

    /// One micro-batch from the `first`-th picture on: its rows (instance pictures,
    /// then as many class pictures with prior preservation), noised at random
    /// timesteps; the loss divided by the accumulation steps, and the epoch of its last
    /// picture. Draws from `rng` in a fixed order, so resumed runs repeat it.
    fn micro_batch_loss(
        &self,
        models: &TrainedModels,
        first: usize,
        rng: &mut StdRng,
        train_order: &mut EpochOrder,
        class_order: &mut EpochOrder,
    ) -> Result<(Tensor<1>, usize), TrainError> {
        let c = &self.config;
        let (micro, n_train) = (c.batch_size, self.train.len());
        let mut epoch = 0;
        let mut latents = Vec::with_capacity(micro);
        let mut embeds = Vec::with_capacity(micro);
        let mut controls = Vec::new();
        for k in 0..micro {
            let global = first + k;
            epoch = global / n_train;
            let item = &self.train[train_order.pick(global)];
            latents.push(self.latents(item, rng));
            controls.extend(item.control.clone());
            // Drawn only when asked, so runs without dropout keep their
            // random stream. The empty caption keeps the picture's time ids.
            let dropped = self.empty_embedding.is_some() && rng.random::<f64>() < c.caption_dropout;
            embeds.push(self.row_conditioning(models, item, dropped)?);
        }
        // Prior preservation: as many class images, after the instance ones.
        let with_prior = !self.class.is_empty();
        if with_prior {
            for k in 0..micro {
                let item = &self.class[class_order.pick(first + k)];
                latents.push(self.latents(item, rng));
                embeds.push(self.row_conditioning(models, item, false)?);
            }
        }
        let rows = latents.len();
        let x0 = Tensor::cat(latents, 0);
        let timesteps: Vec<usize> = (0..rows)
            .map(|_| rng.random_range(0..self.objective.num_train_timesteps()))
            .collect();
        let noise = gaussian(x0.dims(), rng, &self.device);
        let noisy = self
            .objective
            .add_noise(x0.clone(), noise.clone(), &timesteps);
        let target = self.objective.target(x0, noise, &timesteps);
        let t = Objective::timestep_tensor(&timesteps, &self.device);
        let control = (!controls.is_empty()).then(|| Tensor::cat(controls, 0));
        let pred = Self::predict(models, noisy, t, &embeds, control);
        let loss = if with_prior {
            let (ts_i, ts_c) = timesteps.split_at(micro);
            let instance = self.objective.loss(
                pred.clone().narrow(0, 0, micro),
                target.clone().narrow(0, 0, micro),
                ts_i,
            );
            let prior = self.objective.loss(
                pred.narrow(0, micro, micro),
                target.narrow(0, micro, micro),
                ts_c,
            );
            instance + prior.mul_scalar(c.prior_loss_weight)
        } else {
            self.objective.loss(pred, target, &timesteps)
        };
        Ok((loss.div_scalar(c.gradient_accumulation as f64), epoch))
    }

    /// Writes a checkpoint's weights (and the EMA ones) and `trainer_state.json` into
    /// `dir` (the optimizer state is the caller's).
    fn write_checkpoint(
        &self,
        dir: &Path,
        models: &TrainedModels,
        ema: Option<&Ema<TrainedModels>>,
        done: usize,
    ) -> Result<(), TrainError> {
        self.save_models(models, dir, false, false)?;
        if let Some(e) = ema {
            self.save_models(&e.model, dir, true, false)?;
        }
        let state = TrainerState {
            step: done,
            ema_step: ema.map_or(0, |e| e.step),
            config: self.config.clone(),
        };
        let state_path = dir.join("trainer_state.json");
        std::fs::write(
            &state_path,
            serde_json::to_string_pretty(&state).expect("serialisable state"),
        )
        .map_err(|e| TrainError::file(&state_path, e))
    }

    /// Writes `models` into `dir`: `controlnet/`, `unet/` or
    /// `pytorch_lora_weights.safetensors` (`ema_` ones for the EMA models), plus the
    /// kohya file with `kohya_too`.
    fn save_models(
        &self,
        models: &TrainedModels,
        dir: &Path,
        ema: bool,
        kohya_too: bool,
    ) -> Result<(), TrainError> {
        models.save(
            &self.unet_config,
            self.config.lora.as_ref(),
            self.controlnet_config.as_ref(),
            dir,
            self.weights_name(ema),
            kohya_too,
        )
    }

    /// Where a checkpoint keeps the trained weights (`ema`: the EMA ones).
    fn weights_name(&self, ema: bool) -> &'static str {
        let c = &self.config;
        match (c.controlnet.is_some(), c.lora.is_some(), ema) {
            (true, _, false) => "controlnet",
            (true, _, true) => "ema_controlnet",
            (false, false, false) => "unet",
            (false, false, true) => "ema_unet",
            (false, true, false) => "pytorch_lora_weights.safetensors",
            (false, true, true) => "ema_lora.safetensors",
        }
    }

    /// Writes the result: a diffusers pipeline folder `output/model/` (full
    /// fine-tuning), the LoRA files in `output/`, or the ControlNet as a diffusers
    /// folder `output/controlnet/`.
    fn export(&self, models: &TrainedModels) -> Result<(), TrainError> {
        let out = &self.config.output;
        if self.config.controlnet.is_some() {
            return self.save_models(models, out, false, false);
        }
        match &self.config.lora {
            Some(_) => self.save_models(models, out, false, true),
            None => {
                let model = out.join("model");
                for part in [
                    "text_encoder",
                    "text_encoder_2",
                    "vae",
                    "tokenizer",
                    "tokenizer_2",
                    "scheduler",
                ] {
                    let from = self.config.model.join(part);
                    if from.is_dir() {
                        copy_dir(&from, &model.join(part))?;
                    }
                }
                let index = self.config.model.join("model_index.json");
                if index.exists() {
                    std::fs::copy(&index, model.join("model_index.json"))
                        .map_err(|e| TrainError::file(&index, e))?;
                }
                self.save_models(models, &model, false, false)
            }
        }
    }

    /// The prediction the U-Net is trained for.
    pub fn prediction_type(&self) -> PredictionType {
        self.objective.prediction_type
    }

    /// Number of prepared training and validation examples (flips count twice).
    pub fn sizes(&self) -> (usize, usize) {
        (self.train.len(), self.validation.len())
    }

    /// Number of prepared class images (prior preservation).
    pub fn class_images(&self) -> usize {
        self.class.len()
    }
}

/// The shuffled order of `n` examples in each epoch (a permutation seeded by
/// `seed + epoch`), drawn again only when the epoch changes.
struct EpochOrder {
    seed: u64,
    epoch: Option<usize>,
    order: Vec<usize>,
}

impl EpochOrder {
    fn new(seed: u64, n: usize) -> Self {
        Self {
            seed,
            epoch: None,
            order: (0..n).collect(),
        }
    }

    /// The example of the `global`-th draw of the run.
    fn pick(&mut self, global: usize) -> usize {
        let n = self.order.len();
        let epoch = global / n;
        if self.epoch != Some(epoch) {
            self.order = (0..n).collect();
            self.order.shuffle(&mut StdRng::seed_from_u64(
                self.seed.wrapping_add(epoch as u64),
            ));
            self.epoch = Some(epoch);
        }
        self.order[global % n]
    }
}

/// Standard normal noise from `rng`.
pub fn gaussian(shape: [usize; 4], rng: &mut StdRng, device: &Device) -> Tensor<4> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}
