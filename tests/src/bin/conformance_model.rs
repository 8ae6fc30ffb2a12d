//! `conformance-model`: the CloudState CRDT conformance model as a user function.
//!
//! ```text
//! conformance-model [--port 8080] [--host 127.0.0.1]      (or PORT / HOST)
//! ```
//! Serves `cloudstate.EntityDiscovery` and `cloudstate.crdt.Crdt` over h2c.

use std::process::ExitCode;

fn arg(name: &str, env: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> ExitCode {
    let addr = format!(
        "{}:{}",
        arg("--host", "HOST", "127.0.0.1"),
        arg("--port", "PORT", "8080")
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("conformance-model: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("conformance-model listening on {}", listener.local_addr()?);
        latticed_tests::model_uf::serve(
            latticed_tests::model_uf::ConformanceModel::default(),
            listener,
        )
        .await
        .map_err(std::io::Error::other)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conformance-model on {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
