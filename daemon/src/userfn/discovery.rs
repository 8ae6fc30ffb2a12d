//! Discovery: dialling a user function (h2c) and learning what it serves.
//!
//! [`Discovery::run`] calls `/cloudstate.EntityDiscovery/discover` with latticed's
//! `ProxyInfo` until the user function answers, with capped exponential backoff (one log line
//! per try, never a tight loop), validates the `EntitySpec` ([`super::spec::validate`]), and
//! reports every problem to the user function with `reportError` and to the log. An invalid
//! spec keeps the node not ready; discovery keeps asking (at the backoff cap), so a user
//! function restarted with a fixed spec is picked up. The same invalid spec is reported once.

use std::time::Duration;

use latticed_proto::cloudstate::entity_discovery_client::EntityDiscoveryClient;
use latticed_proto::cloudstate::{EntitySpec, ProxyInfo, UserFunctionError};

use super::spec::{validate, UserFunctionModel, CRDT_ENTITY_TYPE, PROTOCOL_VERSION};

/// The name latticed gives itself in `ProxyInfo`.
pub const PROXY_NAME: &str = "latticed";

/// Why one discovery try failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// the address is not a valid endpoint
    #[error("invalid user function address {0}")]
    Address(String),
    /// no connection
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// the call failed
    #[error("discover failed: {0}")]
    Call(#[from] tonic::Status),
}

/// What latticed tells a user function about itself.
pub fn proxy_info() -> ProxyInfo {
    ProxyInfo {
        protocol_major_version: PROTOCOL_VERSION.0,
        protocol_minor_version: PROTOCOL_VERSION.1,
        proxy_name: PROXY_NAME.to_string(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
        supported_entity_types: vec![CRDT_ENTITY_TYPE.to_string()],
    }
}

/// Discovery of one user function.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// `host:port` of the user function
    pub addr: String,
    /// first retry delay
    pub backoff_min: Duration,
    /// largest retry delay
    pub backoff_max: Duration,
}

impl Discovery {
    /// Discovery of the user function at `addr`, retrying from 1 s up to 10 s.
    pub fn new(addr: impl Into<String>) -> Self {
        Discovery {
            addr: addr.into(),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
        }
    }

    async fn client(
        &self,
    ) -> Result<EntityDiscoveryClient<tonic::transport::Channel>, DiscoveryError> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|_| DiscoveryError::Address(self.addr.clone()))?
            .connect_timeout(Duration::from_secs(2));
        Ok(EntityDiscoveryClient::new(endpoint.connect().await?))
    }

    /// One `discover` call.
    pub async fn discover_once(&self) -> Result<EntitySpec, DiscoveryError> {
        let mut client = self.client().await?;
        Ok(client.discover(proxy_info()).await?.into_inner())
    }

    /// Tells the user function about a problem (best effort: a failure is only logged).
    pub async fn report_error(&self, message: &str) {
        let result = async {
            let mut client = self.client().await?;
            client
                .report_error(UserFunctionError {
                    message: message.to_string(),
                })
                .await?;
            Ok::<(), DiscoveryError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(user_function = %self.addr, error = %e, "reportError failed");
        }
    }

    /// Discovers until the user function answers with a valid spec.
    pub async fn run(&self) -> UserFunctionModel {
        let mut delay = self.backoff_min;
        let mut attempt: u64 = 0;
        let mut last_invalid: Option<Vec<u8>> = None;
        loop {
            attempt += 1;
            match self.discover_once().await {
                Ok(spec) => match validate(&spec) {
                    Ok(model) => {
                        tracing::info!(user_function = %self.addr, served = %model.description,
                            entities = model.entities.len(), "discovered the user function");
                        return model;
                    }
                    Err(problems) => {
                        let fingerprint = prost::Message::encode_to_vec(&spec);
                        if last_invalid.as_ref() != Some(&fingerprint) {
                            for p in &problems {
                                tracing::error!(user_function = %self.addr, problem = %p,
                                    "the user function's spec is invalid; not serving it");
                                self.report_error(p).await;
                            }
                            last_invalid = Some(fingerprint);
                        }
                        delay = self.backoff_max;
                    }
                },
                Err(e) => {
                    tracing::warn!(user_function = %self.addr, attempt, retry_in = ?delay,
                        error = %e, "user function not reachable yet");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.backoff_max);
        }
    }
}
