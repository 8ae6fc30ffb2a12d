//! `latticed register`: keeps a user function registered with the latticed on its node, for a
//! user function that does not register itself (a sidecar in its pod, see
//! docker/kubernetes/user-function.yaml).
//!
//! It calls `latticed.admin.v1.UserFunctions/Register(address, ttl)` on the daemon's front-end,
//! renews the lease every third of the ttl, retries a failed call with backoff (the daemon or
//! the user function may start later), and on SIGTERM/SIGINT ends the registration with
//! `Deregister` and exits 0. Exit 1 only for what retrying cannot fix: an unreadable token
//! file, or a refusal that will not change (bad token or source, a spec the daemon rejects).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use latticed_proto::latticed::admin::v1::user_functions_client::UserFunctionsClient;
use latticed_proto::latticed::admin::v1::{DeregisterRequest, RegisterRequest};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// What `latticed register` was asked.
#[derive(Clone, Debug)]
pub struct RegisterOptions {
    /// the daemon's front-end, host:port
    pub latticed: String,
    /// the user function's address as the daemon dials it, host:port
    pub address: String,
    /// the lease asked for
    pub ttl: Duration,
    /// the bearer token's file
    pub token_file: Option<PathBuf>,
}

/// Longest wait between two tries of a failed call.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bound of each call (a Register discovers the user function, within 5 s on the daemon's side).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call failed.
enum Failure {
    /// worth trying again (the daemon or the user function not there yet)
    Retry(String),
    /// it will not work by trying again
    Fatal(String),
}

fn classify(status: &tonic::Status) -> Failure {
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument => {
            Failure::Fatal(text)
        }
        // FAILED_PRECONDITION (a spec the daemon refuses) and ALREADY_EXISTS (another user
        // function serves the service) may change when the user function or the other one
        // changes: keep trying, loudly
        _ => Failure::Retry(text),
    }
}

fn request<T>(msg: T, token: Option<&str>) -> Result<tonic::Request<T>, Failure> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    if let Some(t) = token {
        let value = format!("Bearer {t}")
            .parse()
            .map_err(|_| Failure::Fatal("the token is not a valid header value".into()))?;
        r.metadata_mut().insert("authorization", value);
    }
    Ok(r)
}

struct Registrar {
    opts: RegisterOptions,
    token: Option<String>,
    client: UserFunctionsClient<Channel>,
}

impl Registrar {
    async fn register(&mut self) -> Result<Vec<String>, Failure> {
        let msg = RegisterRequest {
            address: self.opts.address.clone(),
            ttl_seconds: self.opts.ttl.as_secs().clamp(1, u32::MAX as u64) as u32,
        };
        let r = self
            .client
            .register(request(msg, self.token.as_deref())?)
            .await
            .map_err(|s| classify(&s))?;
        Ok(r.into_inner().services)
    }

    async fn deregister(&mut self) -> Result<bool, Failure> {
        let msg = DeregisterRequest {
            address: self.opts.address.clone(),
        };
        let r = self
            .client
            .deregister(request(msg, self.token.as_deref())?)
            .await
            .map_err(|s| classify(&s))?;
        Ok(r.into_inner().removed)
    }
}

/// Reads the token file (trimmed, as the daemon reads its own).
fn read_token(opts: &RegisterOptions) -> Result<Option<String>, String> {
    let Some(path) = &opts.token_file else {
        return Ok(None);
    };
    let t = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the token {}: {e}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    Ok(Some(t))
}

async fn run(opts: RegisterOptions) -> Result<(), String> {
    let token = read_token(&opts)?;
    let endpoint = Endpoint::from_shared(format!("http://{}", opts.latticed))
        .map_err(|e| format!("--latticed {}: {e}", opts.latticed))?
        .connect_timeout(Duration::from_secs(2));
    let mut r = Registrar {
        client: UserFunctionsClient::new(endpoint.connect_lazy()),
        token,
        opts,
    };
    let renew = (r.opts.ttl / 3).max(Duration::from_secs(1));
    let mut stop = std::pin::pin!(crate::cli::wait_for_signal());
    let mut backoff = Duration::from_millis(200);
    let mut registered = false;
    loop {
        let wait = match r.register().await {
            Ok(services) => {
                if !registered {
                    tracing::info!(address = %r.opts.address, latticed = %r.opts.latticed,
                        ?services, ttl = ?r.opts.ttl, "registered");
                }
                registered = true;
                backoff = Duration::from_millis(200);
                renew
            }
            Err(Failure::Fatal(e)) => return Err(format!("registering: {e}")),
            Err(Failure::Retry(e)) => {
                tracing::warn!(address = %r.opts.address, latticed = %r.opts.latticed,
                    error = %e, retry_in = ?backoff, "registering failed");
                registered = false;
                let w = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF).min(renew);
                w
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            signal = &mut stop => {
                tracing::info!(signal = ?signal.ok(), "deregistering");
                return match r.deregister().await {
                    Ok(removed) => {
                        tracing::info!(removed, "deregistered");
                        Ok(())
                    }
                    Err(Failure::Fatal(e) | Failure::Retry(e)) => {
                        // the lease ends by itself
                        tracing::warn!(error = %e, "deregistering failed; the lease will end");
                        Ok(())
                    }
                };
            }
        }
    }
}

/// Runs `latticed register` to its end; the process's exit code.
pub fn main(opts: RegisterOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("latticed register: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latticed register: {e}");
            ExitCode::FAILURE
        }
    }
}
