//! The HTTP server on loopback, on the tiny fixtures: every endpoint's happy path
//! with its response checked field by field against the OpenAI and AUTOMATIC1111
//! shapes, native jobs with Server-Sent Events and cancel, a full queue, API keys,
//! batching, and (in `malformed`) requests that must get a 4xx.

mod a1111;
mod malformed;
mod native;
mod openai;
mod ops;

use std::io::{BufRead, BufReader};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use stable_diffusion::image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use stable_diffusion::pipelines::image;

use crate::common::fixture;
use sd_server::{ModelConfig, RunningServer, Server, ServerConfig};

/// A server on a free loopback port, stopped when dropped.
pub struct TestServer {
    pub base: String,
    /// Stops the server when the test's server is dropped.
    _server: RunningServer,
    agent: ureq::Agent,
}

/// One answer: status, `Retry-After`, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub retry_after: Option<String>,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// The tiny SD 1.5 fixture with LoRAs, a ControlNet and TAESD, and its single file.
pub fn tiny_models() -> Vec<ModelConfig> {
    let mut tiny = ModelConfig::new("tiny", fixture("tiny-sd15").to_string_lossy());
    tiny.lora_dir = Some(fixture("lora"));
    tiny.controlnets
        .insert("tiny-cn".into(), fixture("tiny-controlnet"));
    tiny.tiny_vae = Some(fixture("tiny-taesd"));
    tiny.depth_model = Some(
        fixture("tiny-depth-anything")
            .to_string_lossy()
            .into_owned(),
    );
    tiny.default_steps = Some(3);
    let mut file = ModelConfig::new(
        "tiny-file",
        fixture("tiny-sd15.safetensors").to_string_lossy(),
    );
    file.config = Some(fixture("tiny-sd15"));
    vec![tiny, file]
}

pub fn config() -> ServerConfig {
    ServerConfig {
        models: tiny_models(),
        preview_every: 1,
        ..ServerConfig::default()
    }
}

impl TestServer {
    pub fn start(config: ServerConfig) -> Self {
        let server = Server::start(config)
            .expect("server starts")
            .spawn("127.0.0.1:0".parse().unwrap())
            .expect("server serves");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        let s = Self {
            base: server.url(),
            _server: server,
            agent,
        };
        s.wait_ready();
        s
    }

    /// The server most tests share (no test of it interrupts others' jobs).
    pub fn shared() -> &'static TestServer {
        static SERVER: OnceLock<TestServer> = OnceLock::new();
        SERVER.get_or_init(|| TestServer::start(config()))
    }

    fn wait_ready(&self) {
        for _ in 0..600 {
            if self.get("/ready").status == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server not ready");
    }

    fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut r = r.expect("the server answers");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let (retry_after, content_type) = (
            header("retry-after"),
            header("content-type").unwrap_or_default(),
        );
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        let body = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap_or_default();
        Reply {
            status: r.status().as_u16(),
            headers,
            retry_after,
            content_type,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        Self::reply(self.agent.get(format!("{}{path}", self.base)).call())
    }

    pub fn get_with(&self, path: &str, header: (&str, &str)) -> Reply {
        Self::reply(
            self.agent
                .get(format!("{}{path}", self.base))
                .header(header.0, header.1)
                .call(),
        )
    }

    pub fn delete_with(&self, path: &str, header: (&str, &str)) -> Reply {
        Self::reply(
            self.agent
                .delete(format!("{}{path}", self.base))
                .header(header.0, header.1)
                .call(),
        )
    }

    pub fn delete(&self, path: &str) -> Reply {
        Self::reply(self.agent.delete(format!("{}{path}", self.base)).call())
    }

    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Reply {
        Self::reply(
            self.agent
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .send(body),
        )
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, "application/json", body.to_string().as_bytes())
    }

    pub fn post_with(&self, path: &str, header: (&str, &str), body: &Value) -> Reply {
        Self::reply(
            self.agent
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .header(header.0, header.1)
                .send(body.to_string().as_bytes()),
        )
    }

    /// The Server-Sent Events of a job, `(event, data)`, until the stream ends.
    pub fn events(&self, id: &str) -> Vec<(String, Value)> {
        let r = self
            .agent
            .get(format!("{}/v1/jobs/{id}/events", self.base))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let reader = BufReader::new(r.into_body().into_reader());
        let (mut out, mut name) = (Vec::new(), String::new());
        for line in reader.lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                out.push((name.clone(), serde_json::from_str(d).unwrap()));
            }
        }
        out
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A base64 PNG decoded, checked to be `w x h`, with its A1111 `parameters` chunk.
pub fn decode_png(text: &str, w: u32, h: u32) -> DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64");
    let img = image::load_from_memory_with_format(&bytes, ImageFormat::Png).expect("a PNG");
    assert_eq!((img.width(), img.height()), (w, h));
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("parameters") && text.contains("Steps: "),
        "the PNG carries its parameters"
    );
    img
}

pub fn png(image: DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A 32x32 picture: red left half, blue right half.
pub fn picture() -> RgbImage {
    RgbImage::from_fn(32, 32, |x, _| {
        if x < 16 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([30, 30, 220])
        }
    })
}

/// A 32x32 RGBA picture transparent in its right half (OpenAI's edit region).
pub fn transparent_right() -> RgbaImage {
    RgbaImage::from_fn(32, 32, |x, _| {
        image::Rgba([255, 255, 255, if x < 16 { 255 } else { 0 }])
    })
}

/// The keys of a JSON object, sorted.
pub fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    k.sort();
    k
}
