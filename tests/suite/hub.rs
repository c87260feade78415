//! `from_pretrained("owner/name")` against a loopback HTTP server that serves
//! `tests/fixtures/tiny-sd15` in the hub's URL layout (`/api/models/{repo}/revision/
//! {rev}` and `/{repo}/resolve/{rev}/{file}`); no test touches the internet.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stable_diffusion::pipelines::HubOptions;
use stable_diffusion::prelude::*;

use crate::common::fixture;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A request the server saw: its path and its `Authorization` header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The hub's two endpoints over a folder, on 127.0.0.1. The listing also names a
/// pickle file that is not there, which a client must never ask for.
struct HubServer {
    endpoint: String,
    seen: Seen,
}

impl HubServer {
    fn start(root: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen: Seen = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (root, log) = (root.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = handle(stream, &root, &log);
                });
            }
        });
        Self { endpoint, seen }
    }

    fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files_under(root, &p, out);
        } else {
            out.push(
                p.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
}

/// FNV-1a of the content: the blob's etag.
fn etag(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

fn handle(mut stream: TcpStream, root: &Path, log: &Seen) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_string()),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    log.lock().unwrap().push((path.clone(), auth));
    let respond =
        |stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes())?;
            stream.write_all(body)
        };
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let _repo_and_revision = rest;
        let mut files = Vec::new();
        files_under(root, root, &mut files);
        files.push("unet/diffusion_pytorch_model.bin".into());
        let siblings: Vec<String> = files
            .iter()
            .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        let json = [("Content-Type".to_string(), "application/json".to_string())];
        return respond(&mut stream, "200 OK", &json, body.as_bytes());
    }
    // /{owner}/{name}/resolve/{revision}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let file = match parts.as_slice() {
        [_, _, "resolve", _, file] => root.join(file),
        _ => return respond(&mut stream, "404 Not Found", &[], b""),
    };
    let Ok(bytes) = std::fs::read(&file) else {
        return respond(&mut stream, "404 Not Found", &[], b"");
    };
    let n = bytes.len();
    let (start, end) = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(n.saturating_sub(1));
            (a.min(n), b.min(n.saturating_sub(1)))
        })
        .unwrap_or((0, n.saturating_sub(1)));
    let body = if n == 0 {
        &bytes[..]
    } else {
        &bytes[start..=end.max(start).min(n - 1)]
    };
    let headers = [
        ("ETag".to_string(), format!("\"{}\"", etag(&bytes))),
        ("X-Repo-Commit".to_string(), COMMIT.to_string()),
        (
            "Content-Range".to_string(),
            format!("bytes {start}-{end}/{n}"),
        ),
    ];
    respond(&mut stream, "206 Partial Content", &headers, body)
}

fn hub_options(
    server: &HubServer,
    cache: &Path,
    offline: bool,
    token: Option<&str>,
) -> LoadOptions {
    LoadOptions {
        hub: HubOptions {
            endpoint: Some(server.endpoint.clone()),
            cache_dir: Some(cache.to_path_buf()),
            token: token.map(String::from),
            offline: Some(offline),
        },
        ..Default::default()
    }
}

#[test]
fn downloads_only_the_safetensors_a_pipeline_needs_then_works_offline() {
    let server = HubServer::start(fixture("tiny-sd15"));
    let cache = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let options = hub_options(&server, cache.path(), false, Some("hf_secret"));
    let pipe = StableDiffusionPipeline::from_pretrained("tiny-owner/tiny-sd15", &device, &options)
        .unwrap();
    assert_eq!(pipe.name(), "tiny-sd15");
    let paths = server.paths();
    assert!(paths.iter().all(|p| !p.ends_with(".bin")), "{paths:?}");
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("unet/diffusion_pytorch_model.safetensors"))
    );
    assert!(
        !paths.iter().any(|p| p.contains(".fp16.")),
        "no variant asked: {paths:?}"
    );
    let auth = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, a)| a.clone())
        .collect::<Vec<_>>();
    assert!(auth.iter().any(|a| a == "Bearer hf_secret"), "{auth:?}");
    // The standard cache layout: blobs and a snapshot of the commit.
    let repo_dir = cache.path().join("models--tiny-owner--tiny-sd15");
    assert!(
        repo_dir
            .join("snapshots")
            .join(COMMIT)
            .join("unet/config.json")
            .exists()
    );
    let out = pipe
        .generate(
            GenerationRequest::new("a fox")
                .size(32, 32)
                .steps(2)
                .seed(1),
        )
        .unwrap();
    assert_eq!(out.images.len(), 1);

    // Offline: the cache alone, no request.
    let before = server.paths().len();
    let offline = hub_options(&server, cache.path(), true, None);
    StableDiffusionPipeline::from_pretrained("tiny-owner/tiny-sd15", &device, &offline).unwrap();
    assert_eq!(server.paths().len(), before);
    // Loading again online fetches nothing new either (the cache holds every file).
    StableDiffusionPipeline::from_pretrained("tiny-owner/tiny-sd15", &device, &options).unwrap();
    let after: Vec<String> = server.paths()[before..].to_vec();
    assert!(after.iter().all(|p| p.starts_with("/api/")), "{after:?}");
}

#[test]
fn the_fp16_variant_is_fetched_on_request() {
    let server = HubServer::start(fixture("tiny-sd15"));
    let cache = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        variant: Some("fp16".into()),
        ..hub_options(&server, cache.path(), false, None)
    };
    StableDiffusionPipeline::from_pretrained("tiny-owner/tiny-sd15", &Device::flex(), &options)
        .unwrap();
    let paths = server.paths();
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("unet/diffusion_pytorch_model.fp16.safetensors"))
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with("unet/diffusion_pytorch_model.safetensors"))
    );
    // Components without an fp16 file fall back to the plain one.
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("vae/diffusion_pytorch_model.safetensors"))
    );
}

#[test]
fn offline_without_a_cache_and_unknown_repositories_are_errors() {
    let server = HubServer::start(fixture("tiny-sd15"));
    let cache = tempfile::tempdir().unwrap();
    let offline = hub_options(&server, cache.path(), true, None);
    let err =
        StableDiffusionPipeline::from_pretrained("tiny-owner/tiny-sd15", &Device::flex(), &offline)
            .err()
            .unwrap();
    assert!(err.to_string().contains("offline"), "{err}");
    assert!(server.paths().is_empty());
    // A server that knows no such repository: the listing fails.
    let empty = tempfile::tempdir().unwrap();
    let server = HubServer::start(empty.path().to_path_buf());
    let options = hub_options(&server, cache.path(), false, None);
    let err =
        StableDiffusionPipeline::from_pretrained("someone/nothing", &Device::flex(), &options)
            .err()
            .unwrap();
    assert!(err.to_string().contains("model_index.json"), "{err}");
}

/// A depth model by hub id: config, safetensors weights and processor config fetched
/// (the listed pickle never), then found offline in the cache.
#[test]
fn depth_model_downloads_by_repository_id() {
    use stable_diffusion::pipelines::preprocess::DepthEstimator;
    let server = HubServer::start(fixture("tiny-depth-anything"));
    let cache = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let hub = hub_options(&server, cache.path(), false, None).hub;
    let estimator =
        DepthEstimator::from_pretrained("tiny-owner/tiny-depth", &device, &hub).unwrap();
    assert_eq!(estimator.processor().size.height, 56);
    let paths = server.paths();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        assert!(paths.iter().any(|p| p.ends_with(f)), "{f}: {paths:?}");
    }
    assert!(paths.iter().all(|p| !p.ends_with(".bin")), "{paths:?}");
    let before = server.paths().len();
    let offline = hub_options(&server, cache.path(), true, None).hub;
    DepthEstimator::from_pretrained("tiny-owner/tiny-depth", &device, &offline).unwrap();
    assert_eq!(server.paths().len(), before);
    // an unknown repository offline: a clear error
    let err = DepthEstimator::from_pretrained("tiny-owner/tiny-sd15-missing", &device, &offline)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

/// ControlNets and T2I-Adapters by hub id (`LoadOptions::controlnets` / `adapters`
/// with the load's hub settings): config and safetensors weights fetched, the pickle
/// never; the result is the folder's model.
#[test]
fn controlnet_and_adapter_download_by_repository_id() {
    let cn_server = HubServer::start(fixture("tiny-controlnet"));
    let cache = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let options = LoadOptions {
        controlnets: vec!["tiny-owner/tiny-controlnet".into()],
        ..hub_options(&cn_server, cache.path(), false, None)
    };
    let pipe =
        StableDiffusionPipeline::from_pretrained(fixture("tiny-sd15"), &device, &options).unwrap();
    assert_eq!(
        pipe.controlnet_names().collect::<Vec<_>>(),
        ["tiny-controlnet"]
    );
    let paths = cn_server.paths();
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("diffusion_pytorch_model.safetensors")),
        "{paths:?}"
    );
    assert!(paths.iter().all(|p| !p.ends_with(".bin")), "{paths:?}");
    // the same ControlNet from the cache, offline, and from the folder: one request,
    // one picture
    let offline = hub_options(&cn_server, cache.path(), true, None).hub;
    let mut pipe = pipe;
    let again = pipe
        .load_controlnet_with("tiny-owner/tiny-controlnet", &offline)
        .unwrap();
    let local = pipe.load_controlnet(fixture("tiny-controlnet")).unwrap();
    let draw = |i: usize| {
        pipe.generate(
            GenerationRequest::new("a fox")
                .size(32, 32)
                .steps(2)
                .seed(3)
                .control(ControlInput::new(
                    i,
                    fixture("reference/controlnet/control_edge.png"),
                )),
        )
        .unwrap()
        .images[0]
            .image
            .clone()
    };
    assert_eq!(draw(again), draw(local));

    let adapter_server = HubServer::start(fixture("tiny-t2i-adapter"));
    let hub = hub_options(&adapter_server, cache.path(), false, None).hub;
    pipe.load_adapter_with("tiny-owner/tiny-t2i-adapter", &hub)
        .unwrap();
    assert_eq!(
        pipe.adapter_names().collect::<Vec<_>>(),
        ["tiny-t2i-adapter"]
    );
}
