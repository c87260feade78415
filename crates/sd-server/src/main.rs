//! `sd-server`: serves Stable Diffusion over HTTP (OpenAI images API, AUTOMATIC1111
//! API, native jobs). With no arguments it serves the demo model on
//! 127.0.0.1:7860.

use std::process::ExitCode;

use clap::Parser;
use sd_server::Server;
use sd_server::cli::Args;

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: answering the requests in flight, ending waiting jobs");
}

/// The worker role: jobs from the shared queue until SIGTERM (then drained), and
/// /health, /ready, /metrics on the listen address.
async fn run_worker(config: sd_server::ServerConfig) -> Result<(), String> {
    let (server, worker) = Server::start_worker(config).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(server.config().listen)
        .await
        .map_err(|e| format!("{}: {e}", server.config().listen))?;
    eprintln!(
        "sd-server worker {}: probes on http://{}",
        worker.name(),
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let app = server.router();
    let probes = tokio::spawn(async move { axum::serve(listener, app).await });
    worker.run(shutdown_signal()).await;
    probes.abort();
    server.stop();
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let worker = args.is_worker();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sd-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sd-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if worker {
            return run_worker(config).await;
        }
        let server = Server::start(config).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(server.config().listen)
            .await
            .map_err(|e| format!("{}: {e}", server.config().listen))?;
        eprintln!(
            "sd-server: listening on http://{}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        server
            .serve(listener, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sd-server: {e}");
            ExitCode::FAILURE
        }
    }
}
