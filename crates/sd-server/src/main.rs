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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match Args::parse().into_config() {
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
