#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

#[cfg(feature = "c2pa")]
pub mod content_credentials;
pub mod controlnet;
pub mod depth;
pub mod error;
pub mod gguf;
pub mod gguf_convert;
pub mod gguf_write;
pub mod image;
pub mod ldm;
pub mod loader;
pub mod lora;
pub mod model;
pub mod noise;
pub mod pil_resize;
pub mod safety_checker;
pub mod save;
pub mod sd3;
pub mod sd3_single_file;
pub mod t2i_adapter;
pub mod t5_tokenizer;
pub mod tokenizer;
pub mod watermark;
pub mod weights;

pub use error::{IoError, WeightsReport};
pub use loader::{CastParameters, KeyMapping, LoadOptions, half_weights_only, load_module};
pub use lora::{LoraComponent, LoraFile, LoraFormat, LoraToSave, save_lora};
pub use model::{ComponentOptions, DiffusersDir, SingleFile};
pub use noise::{read_recorded_noise, recorded_noise_tensors};
pub use save::{save_controlnet, save_text_encoder, save_unet, save_vae, write_safetensors};
pub use sd3_single_file::Sd3SingleFile;
pub use t5_tokenizer::T5Tokenizer;
pub use tokenizer::ClipTokenizer;
pub use watermark::DwtDctWatermark;
pub use weights::{Int8Rows, WeightSource};
