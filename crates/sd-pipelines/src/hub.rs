//! Hub repository ids: this build reads local folders and files only.

use std::path::PathBuf;

use crate::error::PipelineError;
use crate::load::LoadOptions;

/// Resolves a hub repository id to a local folder. This build has no downloader:
/// the error says so and how to get the files.
pub(crate) fn download(
    repo: &str,
    _revision: Option<&str>,
    _options: &LoadOptions,
) -> Result<PathBuf, PipelineError> {
    Err(PipelineError::Source {
        source_name: repo.to_string(),
        message: "no such local file or folder, and this build does not download from the \
                  Hugging Face hub: download the repository's *.safetensors, config.json, \
                  tokenizer/ and scheduler/ files into a folder and pass its path"
            .into(),
    })
}
