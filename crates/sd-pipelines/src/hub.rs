//! Hugging Face hub repositories (`owner/name`): the files a pipeline needs, fetched
//! into the standard cache with the `hub` feature (safetensors only, never pickle),
//! or found there in offline mode.

use std::path::PathBuf;

use crate::error::PipelineError;
use crate::load::LoadOptions;

/// Where and how hub repositories are fetched. Every field left `None` is taken from
/// the environment as `huggingface_hub` does: `HF_ENDPOINT`, `HF_HUB_CACHE` or
/// `HF_HOME` (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`), `HF_TOKEN` (else the
/// token file of the cache's parent folder), `HF_HUB_OFFLINE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub's address (`https://huggingface.co`).
    pub endpoint: Option<String>,
    /// The cache folder (the `hub` folder of `HF_HOME`).
    pub cache_dir: Option<PathBuf>,
    /// An access token for gated or private repositories.
    pub token: Option<String>,
    /// Use only what the cache holds (`HF_HUB_OFFLINE=1`).
    pub offline: Option<bool>,
}

/// [`HubOptions`] with every field decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedHub {
    /// The hub's address.
    pub endpoint: String,
    /// The cache folder.
    pub cache_dir: PathBuf,
    /// The access token, if any.
    pub token: Option<String>,
    /// Cache only.
    pub offline: bool,
}

impl HubOptions {
    /// The options with the environment filled in.
    ///
    /// # Errors
    /// No cache folder: neither set, nor `HF_HUB_CACHE` / `HF_HOME`, nor a home folder.
    pub fn resolve(&self) -> Result<ResolvedHub, PipelineError> {
        self.resolve_with(|name| std::env::var(name).ok(), std::env::home_dir())
    }

    /// [`Self::resolve`] over given variables and home folder.
    pub fn resolve_with(
        &self,
        var: impl Fn(&str) -> Option<String>,
        home: Option<PathBuf>,
    ) -> Result<ResolvedHub, PipelineError> {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| set("HF_ENDPOINT"))
            .unwrap_or_else(|| "https://huggingface.co".into());
        let cache_dir = match &self.cache_dir {
            Some(d) => d.clone(),
            None => set("HF_HUB_CACHE")
                .map(PathBuf::from)
                .or_else(|| set("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
                .or_else(|| home.map(|h| h.join(".cache/huggingface/hub")))
                .ok_or_else(|| PipelineError::Source {
                    source_name: "hub cache".into(),
                    message: "no cache folder: set HF_HOME or HF_HUB_CACHE".into(),
                })?,
        };
        let offline = self.offline.unwrap_or_else(|| {
            set("HF_HUB_OFFLINE")
                .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "ON" | "on" | "yes"))
        });
        Ok(ResolvedHub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir,
            token: self.token.clone().or_else(|| set("HF_TOKEN")),
            offline,
        })
    }
}

/// The files of a diffusers repository a pipeline reads, chosen from its listing:
/// `model_index.json`, each component's config and safetensors weights (the
/// `variant` ones when asked for and present; sharded indexes with their shards
/// added once read), the tokenizer files and the scheduler config. Pickle weights
/// are never chosen; a component that has only those is an error.
///
/// # Errors
/// No `model_index.json` (not a diffusers pipeline), a component without safetensors
/// weights.
pub fn pipeline_files(
    listing: &[String],
    variant: Option<&str>,
) -> Result<Vec<String>, PipelineError> {
    let has = |f: &str| listing.iter().any(|l| l == f);
    if !has("model_index.json") {
        return Err(PipelineError::Source {
            source_name: "hub repository".into(),
            message: "no model_index.json: not a diffusers pipeline (download a single-file \
                      checkpoint yourself and pass its path)"
                .into(),
        });
    }
    let mut files = vec!["model_index.json".to_string()];
    for (component, base) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        files.push(format!("{component}/config.json"));
        match safetensors_weights(listing, &format!("{component}/"), base, variant) {
            Some(w) => files.push(w),
            None => {
                return Err(PipelineError::Source {
                    source_name: component.into(),
                    message: "no .safetensors weights in the repository (pickle .bin files \
                              are never downloaded: they can run code)"
                        .into(),
                });
            }
        }
    }
    for f in [
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ] {
        if has(f) {
            files.push(f.to_string());
        }
    }
    Ok(files)
}

/// The shards a sharded index names, as repository paths next to the index.
///
/// # Errors
/// An index that is not JSON with a `weight_map`.
pub fn index_shards(index_path: &str, text: &str) -> Result<Vec<String>, PipelineError> {
    let bad = |m: &str| PipelineError::Source {
        source_name: index_path.into(),
        message: m.into(),
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad("no weight_map"))?;
    let dir = index_path.rsplit_once('/').map_or("", |(d, _)| d);
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str())
        .filter(|s| s.ends_with(".safetensors") && !s.contains(".."))
        .map(|s| format!("{dir}/{s}"))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Resolves a hub repository to a local folder holding the pipeline's files.
pub(crate) fn download(
    repo: &str,
    revision: Option<&str>,
    options: &LoadOptions,
) -> Result<PathBuf, PipelineError> {
    let variant = options.variant.as_deref();
    download_repo(
        repo,
        revision,
        &options.hub,
        "model_index.json",
        &|listing| pipeline_files(listing, variant),
    )
}

/// The files of a transformers model repository (a depth model): `config.json`, the
/// safetensors weights (`model.safetensors`, or a sharded index whose shards are added
/// once read) and `preprocessor_config.json` when present. Pickle weights are never
/// chosen.
///
/// # Errors
/// No `config.json`, or no safetensors weights.
pub fn model_files(listing: &[String]) -> Result<Vec<String>, PipelineError> {
    let mut files = config_and_weights(listing, "model", None)?;
    if listing.iter().any(|l| l == "preprocessor_config.json") {
        files.push("preprocessor_config.json".into());
    }
    Ok(files)
}

/// The files of a diffusers component repository (a ControlNet or T2I-Adapter, e.g.
/// `lllyasviel/control_v11p_sd15_canny`): `config.json` and
/// `diffusion_pytorch_model[.{variant}].safetensors` (or its sharded index). Pickle
/// weights are never chosen.
///
/// # Errors
/// No `config.json`, or no safetensors weights.
pub fn component_files(
    listing: &[String],
    variant: Option<&str>,
) -> Result<Vec<String>, PipelineError> {
    config_and_weights(listing, "diffusion_pytorch_model", variant)
}

/// `config.json` and the root's [`safetensors_weights`].
fn config_and_weights(
    listing: &[String],
    base: &str,
    variant: Option<&str>,
) -> Result<Vec<String>, PipelineError> {
    let has = |f: &str| listing.iter().any(|l| l == f);
    let err = |m: String| PipelineError::Source {
        source_name: "hub repository".into(),
        message: m,
    };
    if !has("config.json") {
        return Err(err("no config.json at its root: not a single model".into()));
    }
    let weights = safetensors_weights(listing, "", base, variant).ok_or_else(|| {
        err(format!(
            "no {base}.safetensors (pickle .bin files are never downloaded: they can run code)"
        ))
    })?;
    Ok(vec!["config.json".to_string(), weights])
}

/// The first of `{dir}{base}.{variant}.safetensors`, its sharded index,
/// `{dir}{base}.safetensors`, its index in the listing (`dir` empty or ending in `/`).
fn safetensors_weights(
    listing: &[String],
    dir: &str,
    base: &str,
    variant: Option<&str>,
) -> Option<String> {
    let mut candidates = Vec::new();
    if let Some(v) = variant {
        candidates.push(format!("{dir}{base}.{v}.safetensors"));
        candidates.push(format!("{dir}{base}.safetensors.index.{v}.json"));
    }
    candidates.push(format!("{dir}{base}.safetensors"));
    candidates.push(format!("{dir}{base}.safetensors.index.json"));
    candidates.into_iter().find(|c| listing.contains(c))
}

/// Resolves a hub repository of a transformers model (a depth model) to a local folder
/// holding [`model_files`].
pub(crate) fn download_model(
    repo: &str,
    revision: Option<&str>,
    hub: &HubOptions,
) -> Result<PathBuf, PipelineError> {
    download_repo(repo, revision, hub, "config.json", &model_files)
}

/// Resolves a hub repository of a diffusers component (a ControlNet, a T2I-Adapter)
/// to a local folder holding [`component_files`].
pub(crate) fn download_component(
    repo: &str,
    revision: Option<&str>,
    hub: &HubOptions,
    variant: Option<&str>,
) -> Result<PathBuf, PipelineError> {
    download_repo(repo, revision, hub, "config.json", &|listing| {
        component_files(listing, variant)
    })
}

/// Picks the files to fetch from a repository's listing.
type ChooseFiles<'a> = &'a dyn Fn(&[String]) -> Result<Vec<String>, PipelineError>;

#[cfg(not(feature = "hub"))]
fn download_repo(
    repo: &str,
    _revision: Option<&str>,
    _hub: &HubOptions,
    _anchor: &str,
    _choose: ChooseFiles<'_>,
) -> Result<PathBuf, PipelineError> {
    Err(PipelineError::Source {
        source_name: repo.to_string(),
        message: "no such local file or folder, and this build does not download from the \
                  Hugging Face hub: build with the `hub` feature, or download the \
                  repository's *.safetensors and *.json files into a folder and pass its path"
            .into(),
    })
}

/// Resolves a hub repository to a local folder holding the files `choose` picks from
/// its listing: fetched into the cache (only what is missing), or found there in
/// offline mode (by `anchor`, a file every such repository has at its root).
#[cfg(feature = "hub")]
fn download_repo(
    repo: &str,
    revision: Option<&str>,
    hub: &HubOptions,
    anchor: &str,
    choose: ChooseFiles<'_>,
) -> Result<PathBuf, PipelineError> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};

    let hub = hub.resolve()?;
    let err = |m: String| PipelineError::Source {
        source_name: repo.to_string(),
        message: m,
    };
    let handle = Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    let cache = Cache::new(hub.cache_dir.clone());
    if hub.offline {
        let cached = cache.repo(handle.clone());
        let index = cached.get(anchor).ok_or_else(|| {
            err(format!(
                "offline, and {} holds no {anchor} of it",
                hub.cache_dir.display()
            ))
        })?;
        let root = index.parent().map(PathBuf::from).unwrap_or_default();
        return Ok(root);
    }
    let mut builder = ApiBuilder::from_cache(cache)
        .with_endpoint(hub.endpoint.clone())
        .with_progress(false);
    if hub.token.is_some() {
        builder = builder.with_token(hub.token.clone());
    }
    let api = builder.build().map_err(|e| err(e.to_string()))?;
    let remote = api.repo(handle);
    let info = remote
        .info()
        .map_err(|e| err(format!("listing the files: {e}")))?;
    let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut root = None;
    for file in choose(&listing)? {
        let path = remote.get(&file).map_err(|e| err(format!("{file}: {e}")))?;
        if file.ends_with(".json") && file.contains(".safetensors.index") {
            let text = std::fs::read_to_string(&path).map_err(|e| err(format!("{file}: {e}")))?;
            for shard in index_shards(&file, &text)? {
                remote
                    .get(&shard)
                    .map_err(|e| err(format!("{shard}: {e}")))?;
            }
        }
        if file == anchor {
            root = path.parent().map(PathBuf::from);
        }
    }
    root.ok_or_else(|| err(format!("no {anchor} was fetched")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(files: &[&str]) -> Vec<String> {
        files.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_safetensors_and_the_variant() {
        let l = listing(&[
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ]);
        let files = pipeline_files(&l, Some("fp16")).unwrap();
        assert!(files.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".into()));
        assert!(files.contains(&"vae/diffusion_pytorch_model.safetensors".into()));
        assert!(files.contains(&"text_encoder/model.safetensors.index.json".into()));
        assert!(files.iter().all(|f| !f.ends_with(".bin")));
        let plain = pipeline_files(&l, None).unwrap();
        assert!(plain.contains(&"unet/diffusion_pytorch_model.safetensors".into()));
    }

    #[test]
    fn pickle_only_components_and_non_pipelines_are_refused() {
        let l = listing(&["model_index.json", "unet/diffusion_pytorch_model.bin"]);
        assert!(
            pipeline_files(&l, None)
                .unwrap_err()
                .to_string()
                .contains("pickle")
        );
        let l = listing(&["v1-5-pruned-emaonly.safetensors"]);
        assert!(pipeline_files(&l, None).is_err());
    }

    #[test]
    fn shards_are_read_from_the_index() {
        let text = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors",
            "d": "../evil.safetensors"}}"#;
        let shards = index_shards("text_encoder/model.safetensors.index.json", text).unwrap();
        assert_eq!(
            shards,
            [
                "text_encoder/model-00001-of-00002.safetensors",
                "text_encoder/model-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn the_environment_fills_what_is_not_set() {
        let vars = |name: &str| match name {
            "HF_ENDPOINT" => Some("http://127.0.0.1:9/".to_string()),
            "HF_HOME" => Some("/data/hf".to_string()),
            "HF_TOKEN" => Some("hf_x".to_string()),
            "HF_HUB_OFFLINE" => Some("1".to_string()),
            _ => None,
        };
        let r = HubOptions::default().resolve_with(vars, None).unwrap();
        assert_eq!(r.endpoint, "http://127.0.0.1:9");
        assert_eq!(r.cache_dir, PathBuf::from("/data/hf/hub"));
        assert_eq!(r.token.as_deref(), Some("hf_x"));
        assert!(r.offline);
        let explicit = HubOptions {
            cache_dir: Some("/c".into()),
            offline: Some(false),
            ..Default::default()
        };
        let r = explicit.resolve_with(vars, None).unwrap();
        assert_eq!((r.cache_dir, r.offline), (PathBuf::from("/c"), false));
        let none = HubOptions::default()
            .resolve_with(|_| None, Some("/home/u".into()))
            .unwrap();
        assert_eq!(none.endpoint, "https://huggingface.co");
        assert_eq!(
            none.cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        assert!(HubOptions::default().resolve_with(|_| None, None).is_err());
    }
}
