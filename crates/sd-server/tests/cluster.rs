//! The shared queue on loopback, as separate processes: a `redis-server` with
//! append-only persistence (`fsync` on every write) on a free port, two API
//! replicas and three workers of the `sd-server` binary on the tiny SD 1.5
//! fixture. 300 jobs through the three APIs while two workers are killed with
//! SIGKILL mid-job and Redis itself is killed and restarted: every accepted job
//! completes exactly once. Also: a poison job ends in the dead-letter stream,
//! SIGTERM drains a worker, a job queued on one replica is followed and cancelled
//! through the other.
//!
//! Needs `redis-server` on the PATH (Debian's `redis-server` package; `.ci/run`
//! installs it).

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The scenarios share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Whether `redis-server` can run here. Without it the scenarios are skipped
/// with a notice on a developer's machine, and fail under CI (`CI` set), whose
/// script installs it.
fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed (Debian: apt-get install redis-server)"
        );
        eprintln!("skipped: redis-server is not installed (Debian: apt-get install redis-server)");
    }
    found
}

fn fixtures() -> PathBuf {
    match std::env::var_os("SD_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` of the test's own, persisted to its folder.
struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.spawn();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut c) = self.conn()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start");
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = self.conn().expect("redis answers");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c).expect("the command succeeds")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One `sd-server` process (an API replica or a worker), killed when dropped.
struct Node {
    name: String,
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Node {
    fn spawn(name: &str, args: &[String], logs: &Path) -> Self {
        let port = free_port();
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sd-server"))
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("sd-server starts");
        Self {
            name: name.into(),
            port,
            child,
            log,
        }
    }

    fn api(name: &str, redis: &Redis, logs: &Path) -> Self {
        Self::spawn(
            name,
            &[
                "--queue".into(),
                redis.url(),
                "--result-ttl-secs".into(),
                "600".into(),
                "--queue-capacity".into(),
                "1000".into(),
            ],
            logs,
        )
    }

    fn worker(name: &str, redis: &Redis, loras: &Path, logs: &Path) -> Self {
        let model = fixtures().join("tiny-sd15");
        let taesd = fixtures().join("tiny-taesd");
        let args: Vec<String> = [
            "worker",
            "--queue",
            &redis.url(),
            "--worker-name",
            name,
            "--model",
            &format!("tiny={}", model.display()),
            "--lora-dir",
            &format!("tiny={}", loras.display()),
            "--tiny-vae",
            &format!("tiny={}", taesd.display()),
            "--heartbeat-ms",
            "300",
            "--visibility-timeout-secs",
            "3",
            "--max-attempts",
            "3",
            "--max-batch",
            "4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Self::spawn(name, &args, logs)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {}", self.name);
    }

    fn wait_ready(&self, agent: &ureq::Agent) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = agent.get(self.url("/ready")).call()
                && r.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} not ready; log:\n{}", self.name, self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Status and JSON body (Null when the request did not get through).
fn call(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value, Option<String>) {
    match r {
        Ok(mut r) => {
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let status = r.status().as_u16();
            let body = r
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_json()
                .unwrap_or(Value::Null);
            (status, body, retry)
        }
        Err(_) => (0, Value::Null, None),
    }
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value, Option<String>) {
    call(agent.post(url).send_json(body))
}

/// Posts until accepted: a 503 (Redis away) is retried after its `Retry-After`
/// (shortened for the test), as a client should; anything else is returned.
fn post_until_accepted(
    agent: &ureq::Agent,
    url: &str,
    body: &Value,
    refused: &Mutex<usize>,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, json, retry_after) = post(agent, url, body);
        if status != 503 || Instant::now() > deadline {
            return (status, json);
        }
        assert!(retry_after.is_some(), "a 503 says when to retry: {json}");
        *refused.lock().unwrap() += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A folder of LoRAs for the workers: a real one, and `poison` (a truncated file
/// every attempt fails to read).
fn lora_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let good = fixtures().join("lora/tiny_unet_lora_diffusers.safetensors");
    std::fs::copy(&good, dir.path().join("style.safetensors")).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(
        dir.path().join("poison.safetensors"),
        &bytes[..bytes.len() / 3],
    )
    .unwrap();
    dir
}

/// Waits until job `id` is over (asking the replicas in turn); its final status.
fn wait_done(agent: &ureq::Agent, apis: &[&Node], id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    let mut k = 0;
    loop {
        let (status, job, _) = call(
            agent
                .get(apis[k % apis.len()].url(&format!("/v1/jobs/{id}")))
                .call(),
        );
        k += 1;
        if status == 200
            && ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or(""))
        {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not over in {limit:?}: {status} {job}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The consumer of the group holding the most entries now, if any.
fn busiest_worker(redis: &Redis) -> Option<(String, usize)> {
    let Ok(mut c) = redis.conn() else {
        return None;
    };
    let reply: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg("sd:q:tiny")
        .arg("workers")
        .query(&mut c);
    let Ok(redis::Value::Array(parts)) = reply else {
        return None;
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return None;
    };
    consumers
        .iter()
        .filter_map(|c| {
            let pair: (String, String) = redis::FromRedisValue::from_redis_value(c.clone()).ok()?;
            Some((pair.0, pair.1.parse().ok()?))
        })
        .max_by_key(|(_, n)| *n)
        .filter(|(_, n)| *n > 0)
}

/// Blocks until some worker holds jobs (or the time runs out).
fn wait_busy(redis: &Redis, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some((name, _)) = busiest_worker(redis) {
            return Some(name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Redis, two API replicas and the named workers, all ready, the model announced;
/// one cluster at a time on the machine.
struct Cluster {
    _serial: std::sync::MutexGuard<'static, ()>,
    logs: tempfile::TempDir,
    loras: tempfile::TempDir,
    redis: Redis,
    apis: [Node; 2],
    workers: BTreeMap<String, Node>,
    agent: ureq::Agent,
}

impl Cluster {
    /// `None` where `redis-server` is missing (and not under CI: see
    /// [`redis_available`]).
    fn start(workers: &[&str]) -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let logs = tempfile::tempdir().unwrap();
        let loras = lora_dir();
        let redis = Redis::start();
        let apis = [
            Node::api("api-a", &redis, logs.path()),
            Node::api("api-b", &redis, logs.path()),
        ];
        let workers: BTreeMap<String, Node> = workers
            .iter()
            .map(|n| {
                let node = Node::worker(n, &redis, loras.path(), logs.path());
                (n.to_string(), node)
            })
            .collect();
        let agent = agent();
        for n in apis.iter().chain(workers.values()) {
            n.wait_ready(&agent);
        }
        // The replicas learn the model from the workers' announcements.
        let deadline = Instant::now() + Duration::from_secs(10);
        for api in &apis {
            while call(agent.get(api.url("/v1/models")).call()).1["data"][0]["id"] != "tiny" {
                assert!(Instant::now() < deadline, "the model was never announced");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Some(Self {
            _serial: serial,
            logs,
            loras,
            redis,
            apis,
            workers,
            agent,
        })
    }
}

#[test]
fn three_hundred_jobs_survive_two_worker_kills_and_a_redis_restart() {
    let Some(Cluster {
        _serial,
        logs,
        loras,
        mut redis,
        apis,
        mut workers,
        agent,
    }) = Cluster::start(&["w1", "w2", "w3"])
    else {
        return;
    };

    let refused = Mutex::new(0usize);
    let accepted: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let sync_ok = Mutex::new(0usize);
    let total = 300;
    let sync_jobs = 60; // 30 OpenAI, 30 A1111, from four client threads
    std::thread::scope(|s| {
        // Native jobs from two clients, alternating replicas.
        for client in 0..2 {
            let (agent, apis, accepted, refused) = (&agent, &apis, &accepted, &refused);
            s.spawn(move || {
                for i in (client..total - sync_jobs).step_by(2) {
                    let body = json!({"prompt": format!("job {i}"), "steps": 3, "seed": i,
                        "width": 64, "height": 64});
                    let (status, created) =
                        post_until_accepted(agent, &apis[i % 2].url("/v1/jobs"), &body, refused);
                    assert_eq!(status, 202, "{created}");
                    accepted
                        .lock()
                        .unwrap()
                        .push(created["id"].as_str().unwrap().to_string());
                    std::thread::sleep(Duration::from_millis(40));
                }
            });
        }
        for client in 0..4 {
            let (agent, apis, sync_ok, refused) = (&agent, &apis, &sync_ok, &refused);
            s.spawn(move || {
                for i in 0..sync_jobs / 4 {
                    let api = &apis[(client + i) % 2];
                    let (status, body) = if client % 2 == 0 {
                        let body = json!({"prompt": format!("openai {client} {i}"), "size": "64x64",
                            "steps": 3, "seed": i});
                        post_until_accepted(
                            agent,
                            &api.url("/v1/images/generations"),
                            &body,
                            refused,
                        )
                    } else {
                        let body = json!({"prompt": format!("a1111 {client} {i}"), "width": 64,
                            "height": 64, "steps": 3, "seed": i, "sampler_name": "Euler"});
                        post_until_accepted(agent, &api.url("/sdapi/v1/txt2img"), &body, refused)
                    };
                    assert_eq!(status, 200, "{body}");
                    let images = body["data"]
                        .as_array()
                        .or(body["images"].as_array())
                        .unwrap();
                    assert_eq!(images.len(), 1, "one picture, once: {body}");
                    *sync_ok.lock().unwrap() += 1;
                }
            });
        }
        // The faults, while the load runs.
        for round in 0..2 {
            let victim = wait_busy(&redis, Duration::from_secs(60)).expect("a worker holds jobs");
            let mut node = workers.remove(&victim).expect("a known worker");
            node.kill9();
            eprintln!("round {round}: killed {victim} (SIGKILL) mid-job");
            let name = format!("w{}", 4 + round);
            workers.insert(
                name.clone(),
                Node::worker(&name, &redis, loras.path(), logs.path()),
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        wait_busy(&redis, Duration::from_secs(60)).expect("a worker holds jobs");
        redis.kill9();
        eprintln!("killed redis-server (SIGKILL)");
        // While Redis is away the replicas refuse with 503 and Retry-After.
        let (status, body, retry) = post(&agent, &apis[0].url("/v1/jobs"), &json!({"prompt": "x"}));
        assert_eq!(status, 503, "{body}");
        assert!(retry.is_some());
        std::thread::sleep(Duration::from_secs(2));
        redis.spawn();
        eprintln!("redis-server restarted");
    });

    let ids = accepted.into_inner().unwrap();
    assert_eq!(ids.len() + sync_jobs, total);
    assert_eq!(*sync_ok.lock().unwrap(), sync_jobs);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "ids are unique"
    );
    let api_refs: Vec<&Node> = apis.iter().collect();
    for id in &ids {
        let job = wait_done(&agent, &api_refs, id, Duration::from_secs(180));
        assert_eq!(job["status"], "succeeded", "{id}: {}", job["error"]);
        assert_eq!(job["images"].as_array().map(Vec::len), Some(1), "{id}");
    }
    // The result each replica shows is the same one.
    for id in ids.iter().step_by(25) {
        let a = call(agent.get(apis[0].url(&format!("/v1/jobs/{id}"))).call()).1;
        let b = call(agent.get(apis[1].url(&format!("/v1/jobs/{id}"))).call()).1;
        assert_eq!(a["images"], b["images"]);
    }
    // Every job's hash says succeeded once; nothing is left queued or in flight.
    let keys: Vec<String> = redis.cmd(&["KEYS", "sd:job:*"]);
    let (mut succeeded, mut ran_again) = (0, 0);
    for k in &keys {
        let state: String = redis.cmd(&["HGET", k, "state"]);
        assert!(state == "succeeded", "{k}: {state}");
        succeeded += 1;
        let attempts: u32 = redis.cmd(&["HGET", k, "attempts"]);
        ran_again += usize::from(attempts > 1);
    }
    // The killed workers' jobs were claimed and run again by the others.
    // Each killed worker's jobs were claimed by another (XAUTOCLAIM), as its log says.
    let claims: usize = std::fs::read_dir(logs.path())
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .map(|log| log.matches("claimed from a silent worker").count())
        .sum();
    assert!(
        claims >= 2,
        "entries claimed from the killed workers: {claims}"
    );
    assert_eq!(succeeded, total, "one hash per job, each succeeded");
    let len: usize = redis.cmd(&["XLEN", "sd:q:tiny"]);
    assert_eq!(len, 0, "the stream is empty");
    let dead: usize = redis.cmd(&["XLEN", "sd:dead"]);
    assert_eq!(dead, 0, "nothing dead-lettered");
    eprintln!(
        "300 jobs: 0 lost, 0 seen twice; {claims} claimed from killed workers, {ran_again} run again; \
         503s while Redis was down: {}",
        refused.lock().unwrap()
    );
}

#[test]
fn a_poison_job_is_dead_lettered_and_sigterm_drains_a_worker() {
    let Some(Cluster {
        _serial,
        logs,
        loras,
        redis,
        apis,
        mut workers,
        agent,
    }) = Cluster::start(&["w1"])
    else {
        return;
    };
    let w1 = workers.remove("w1").expect("started");
    let refs: Vec<&Node> = apis.iter().collect();

    // A poison job: every attempt fails; after three it is dead-lettered.
    let (status, created, _) = post(
        &agent,
        &apis[0].url("/v1/jobs"),
        &json!({"prompt": "poison", "steps": 2, "loras": [{"name": "poison"}]}),
    );
    assert_eq!(status, 202, "{created}");
    let poison = created["id"].as_str().unwrap().to_string();
    let job = wait_done(&agent, &refs, &poison, Duration::from_secs(60));
    assert_eq!(job["status"], "failed", "{job}");
    let dead: redis::streams::StreamRangeReply = redis.cmd(&["XRANGE", "sd:dead", "-", "+"]);
    let jobs: Vec<String> = dead.ids.iter().filter_map(|e| e.get("job")).collect();
    assert_eq!(
        jobs,
        std::slice::from_ref(&poison),
        "the poison job, once, in the dead-letter stream"
    );
    let attempts: String = redis.cmd(&["HGET", &format!("sd:job:{poison}"), "attempts"]);
    assert_eq!(attempts, "3");

    // Idempotency: the same key gives the same job.
    let key_post = |prompt: &str| {
        call(
            agent
                .post(apis[1].url("/v1/jobs"))
                .header("Idempotency-Key", "order-17")
                .send_json(json!({"prompt": prompt, "steps": 3})),
        )
    };
    let (s1, a, _) = key_post("first");
    let (s2, b, _) = key_post("second");
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(a["id"], b["id"]);

    // A job queued through one replica: its events and A1111's progress through
    // the other, and a cancel there that reaches the worker running it.
    let (_, long, _) = post(
        &agent,
        &apis[0].url("/v1/jobs"),
        &json!({"prompt": "long", "steps": 150, "width": 256, "height": 256}),
    );
    let long = long["id"].as_str().unwrap().to_string();
    let events = std::thread::spawn({
        let url = apis[1].url(&format!("/v1/jobs/{long}/events"));
        let agent = agent.clone();
        move || {
            let mut r = agent.get(url).call().expect("the event stream opens");
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut r.body_mut().as_reader(), &mut text);
            text
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let progress = call(agent.get(apis[1].url("/sdapi/v1/progress")).call()).1;
        // (The job queued with the idempotency key above may still be running.)
        if progress["state"]["job"] == long.as_str()
            && progress["progress"].as_f64().unwrap_or(0.0) > 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "no progress seen: {progress}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _, _) = call(
        agent
            .delete(apis[1].url(&format!("/v1/jobs/{long}")))
            .call(),
    );
    assert_eq!(status, 200);
    let job = wait_done(&agent, &refs, &long, Duration::from_secs(30));
    assert_eq!(job["status"], "cancelled", "{job}");
    let events = events.join().unwrap();
    assert!(
        events.contains("event: step") && events.contains("event: cancelled"),
        "{events}"
    );

    // SIGTERM while a job runs: the worker finishes it and exits; what it had
    // taken but not started goes back for another worker.
    let ids: Vec<String> = (0..6)
        .map(|i| {
            let (_, c, _) = post(
                &agent,
                &apis[i % 2].url("/v1/jobs"),
                &json!({"prompt": format!("drain {i}"), "steps": 60, "seed": i, "width": 64, "height": 64}),
            );
            c["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(wait_busy(&redis, Duration::from_secs(30)).is_some());
    let mut w1 = w1;
    w1.sigterm();
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(status) = w1.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not drain:\n{}",
            w1.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(w1.log_text().contains("drained"));
    let w2 = Node::worker("w2", &redis, loras.path(), logs.path());
    w2.wait_ready(&agent);
    for id in &ids {
        let job = wait_done(&agent, &refs, id, Duration::from_secs(120));
        assert_eq!(job["status"], "succeeded", "{id}: {job}");
    }
    let held: Vec<redis::Value> =
        redis.cmd(&["XPENDING", "sd:q:tiny", "workers", "-", "+", "100", "w1"]);
    assert!(held.is_empty(), "the drained worker holds nothing");
    drop(w2);
}
