//! Command line and environment: every flag of `latticed`, with its `LATTICED_*` variable and
//! default. This module owns parsing and validation only; it starts nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::DaemonError;

/// latticed: a CRDT replication daemon for CloudState user functions.
///
/// With no subcommand, `run` is assumed: `latticed --node-name n1 ...` starts a node.
/// `latticed check-uf HOST:PORT` tells whether latticed can serve a user function, and how it
/// behaves (headers, half-close, stream_cancelled, HTTP/2 limits), without running a node.
#[derive(Debug, Parser)]
#[command(name = "latticed", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// what to do (default: run)
    #[command(subcommand)]
    pub command: Option<Command>,
    /// flags of `run`, accepted without the subcommand
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at startup
pub enum Command {
    /// Start a node (the default).
    Run(RunArgs),
    /// Create the cluster CA and node certificates for mutual TLS between nodes.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Probe a user function as latticed will use it, and say whether latticed can serve it.
    ///
    /// Read-only: it connects over h2c, reads the server's HTTP/2 SETTINGS, runs discovery as
    /// latticed does (nothing is sent with reportError) and validates the spec, then opens one
    /// Crdt/handle call for a throwaway entity `latticed-check-<hex>` (init without a value,
    /// no command) to see whether the user function withholds its response headers, answers
    /// a stream_cancelled for a command it never got, and completes its side after a
    /// half-close. Exit 0: usable; 1: not usable, with the problems listed.
    #[command(name = "check-uf")]
    CheckUf(CheckUfArgs),
    /// Keep a user function registered with a latticed (a sidecar beside a user function
    /// that does not register itself).
    ///
    /// Registers ADDRESS with the latticed at --latticed (`latticed.admin.v1.UserFunctions` on
    /// its front-end), renews the lease every third of --ttl, retries failures with backoff,
    /// and on SIGTERM/SIGINT deregisters and exits 0. Exit 1 when the token cannot be read or
    /// the daemon refuses the token or the source address.
    Register(RegisterArgs),
}

/// `latticed register --latticed HOST:PORT --address HOST:PORT`
#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// The latticed front-end to register with, host:port (in Kubernetes: the node's address,
    /// status.hostIP, and the DaemonSet's hostPort)
    #[arg(long)]
    pub latticed: String,
    /// The user function's address as latticed dials it, host:port (h2c; in Kubernetes: the
    /// pod's address, status.podIP)
    #[arg(long)]
    pub address: String,
    /// The lease asked for; renewed every third of it
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// A file holding the bearer token (the daemon's --registration-token-file)
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// `latticed check-uf HOST:PORT`
#[derive(Debug, Clone, Args)]
pub struct CheckUfArgs {
    /// The user function, host:port (as given to --user-function)
    #[arg(value_parser = crate::userfn::check::parse_addr)]
    pub addr: String,
    /// How long each step may take (connect, discovery, each wait on Crdt/handle)
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The CRDT entity to open Crdt/handle on (full or simple service name) [default: the
    /// first of the spec]
    #[arg(long)]
    pub service: Option<String>,
    /// Print the report as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// `latticed certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca-key.pem.
    Init {
        /// folder for the files (created if missing)
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// overwrite existing files
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate signed by the CA in DIR: DIR/NAME.pem and DIR/NAME-key.pem.
    Issue {
        /// folder holding ca.pem and ca-key.pem
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// the node name: it must equal the node's --node-name (the certificate carries it as
        /// a DNS name, with `latticed`, the name nodes dial)
        #[arg(long)]
        name: String,
        /// overwrite existing files
        #[arg(long)]
        force: bool,
    },
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// human-readable lines
    Text,
    /// one JSON object per line
    Json,
}

/// Flags of `latticed run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// This node's name, unique in the cluster [default: the host name]
    #[arg(long, env = "LATTICED_NODE_NAME")]
    pub node_name: Option<String>,

    /// UDP address of the QUIC endpoint that peers connect to (SWIM and replication)
    #[arg(long, env = "LATTICED_CLUSTER_ADDR", default_value = "0.0.0.0:7946")]
    pub cluster_addr: SocketAddr,

    /// The address peers should use to reach this node [default: --cluster-addr, or
    /// 127.0.0.1 with its port when --cluster-addr is a wildcard and the node runs alone]
    #[arg(long, env = "LATTICED_ADVERTISE_ADDR")]
    pub advertise_addr: Option<SocketAddr>,

    /// TCP address of the admin HTTP endpoint (/healthz, /readyz, /metrics, /v1/...)
    #[arg(long, env = "LATTICED_ADMIN_ADDR", default_value = "127.0.0.1:9099")]
    pub admin_addr: SocketAddr,

    /// TCP address of the front-end serving the user functions' gRPC services to clients (this
    /// node's, and other nodes' through routing)
    #[arg(long, env = "LATTICED_LISTEN", default_value = "0.0.0.0:9000")]
    pub listen: SocketAddr,

    /// A user function to serve, host:port (repeatable; the variable takes a comma-separated
    /// list; `none` for a node without one: its front-end still serves the services of other
    /// nodes' user functions)
    /// [default: $USER_FUNCTION_HOST:$USER_FUNCTION_PORT, else 127.0.0.1:8080]
    #[arg(
        long = "user-function",
        env = "LATTICED_USER_FUNCTION",
        value_delimiter = ','
    )]
    pub user_function: Vec<String>,

    /// How long an entity may sit idle before it is passivated (unless its user function
    /// declares its own timeout)
    #[arg(long, env = "LATTICED_PASSIVATION_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub passivation_timeout: Duration,

    /// How long the user function may take to answer a command; past it the client gets
    /// DEADLINE_EXCEEDED and the entity restarts (the reference proxy's relay-timeout)
    #[arg(long, env = "LATTICED_RELAY_TIMEOUT", default_value = "1m", value_parser = parse_duration)]
    pub relay_timeout: Duration,

    /// Commands one entity may have in flight; more are refused with RESOURCE_EXHAUSTED (the
    /// reference proxy's proxy-parallelism)
    #[arg(long, env = "LATTICED_MAX_COMMANDS_PER_ENTITY", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_commands_per_entity: u32,

    /// Active entities per user function (each holds a handle stream); more are refused with
    /// RESOURCE_EXHAUSTED
    #[arg(long, env = "LATTICED_MAX_ENTITIES_PER_USER_FUNCTION", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_entities_per_user_function: u32,

    /// The largest message a user function accepts, in bytes (gRPC servers default to 4 MiB);
    /// a larger command is refused up front with RESOURCE_EXHAUSTED
    #[arg(long, env = "LATTICED_USER_FUNCTION_MAX_MESSAGE", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub user_function_max_message: u32,

    /// Entity streams per HTTP/2 connection to a user function, at most (its server's
    /// SETTINGS_MAX_CONCURRENT_STREAMS, read at discovery, lowers it); more streams open more
    /// connections
    #[arg(long, env = "LATTICED_USER_FUNCTION_STREAMS_PER_CONNECTION", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub user_function_streams_per_connection: u32,

    /// PEM certificate chain for TLS on the front-end (with --listen-tls-key); without it the
    /// front-end speaks plain HTTP/1.1 and h2c
    #[arg(long, env = "LATTICED_LISTEN_TLS_CERT", requires = "listen_tls_key")]
    pub listen_tls_cert: Option<PathBuf>,

    /// PEM private key of --listen-tls-cert
    #[arg(long, env = "LATTICED_LISTEN_TLS_KEY", requires = "listen_tls_cert")]
    pub listen_tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): front-end clients must present a certificate signed by one
    /// (mutual TLS); needs --listen-tls-cert
    #[arg(
        long,
        env = "LATTICED_LISTEN_TLS_CLIENT_CA",
        requires = "listen_tls_cert"
    )]
    pub listen_tls_client_ca: Option<PathBuf>,

    /// A file holding the bearer token user functions must present to register themselves
    /// (`latticed.admin.v1.UserFunctions` on the front-end's port); with it or
    /// --registration-allow, registration is on
    #[arg(long, env = "LATTICED_REGISTRATION_TOKEN_FILE")]
    pub registration_token_file: Option<PathBuf>,

    /// Source networks (CIDR, or one address) allowed to register user functions (repeatable;
    /// the variable takes a comma-separated list); with a token file, both must hold
    #[arg(
        long = "registration-allow",
        env = "LATTICED_REGISTRATION_ALLOW",
        value_delimiter = ','
    )]
    pub registration_allow: Vec<String>,

    /// Source networks (CIDR, or one address) served the admin endpoint's inspect paths
    /// (/v1/keys..., which show every value) without a token (repeatable; the variable takes a
    /// comma-separated list). Probes, /metrics and /v1/members are served to anyone
    #[arg(
        long = "admin-inspect-allow",
        env = "LATTICED_ADMIN_INSPECT_ALLOW",
        value_delimiter = ',',
        default_values_t = ["127.0.0.0/8".to_string(), "::1".to_string()]
    )]
    pub admin_inspect_allow: Vec<String>,

    /// A file holding a bearer token (`authorization: Bearer <token>`) that opens the admin
    /// endpoint's inspect paths from any source
    #[arg(long, env = "LATTICED_ADMIN_INSPECT_TOKEN_FILE")]
    pub admin_inspect_token_file: Option<PathBuf>,

    /// Longest entity id the front-end accepts, in bytes (the key fields' values joined); a
    /// longer one is refused with INVALID_ARGUMENT before it reaches an entity
    #[arg(long, env = "LATTICED_MAX_ENTITY_ID_BYTES", default_value_t = 64 * 1024)]
    pub max_entity_id_bytes: usize,

    /// How long a client connection to the front-end may stay without a request in progress
    /// before it is closed (HTTP/2: GOAWAY)
    #[arg(long, env = "LATTICED_CLIENT_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub client_idle_timeout: Duration,

    /// A peer to join through, host:port (repeatable; the variable takes a comma-separated list)
    #[arg(long = "join", env = "LATTICED_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,

    /// A DNS name resolving to peers, name:port, re-resolved periodically (a Kubernetes
    /// headless service; repeatable; the variable takes a comma-separated list)
    #[arg(long = "join-dns", env = "LATTICED_JOIN_DNS", value_delimiter = ',')]
    pub join_dns: Vec<String>,

    /// How often --join-dns names are resolved again
    #[arg(long, env = "LATTICED_JOIN_DNS_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub join_dns_interval: Duration,

    /// PEM file of the cluster CA (or several, one after the other, while a new CA rolls in):
    /// peers must present a certificate one of them signed
    #[arg(long, env = "LATTICED_CA_CERT", requires_all = ["cert", "key"])]
    pub ca_cert: Option<PathBuf>,

    /// PEM file of this node's certificate (chain), signed by the cluster CA
    #[arg(long, env = "LATTICED_CERT", requires_all = ["ca_cert", "key"])]
    pub cert: Option<PathBuf>,

    /// PEM file of this node's private key
    #[arg(long, env = "LATTICED_KEY", requires_all = ["ca_cert", "cert"])]
    pub key: Option<PathBuf>,

    /// SWIM: how often a random member is probed
    #[arg(long, env = "LATTICED_PROBE_PERIOD", default_value = "1s", value_parser = parse_duration)]
    pub probe_period: Duration,

    /// SWIM: how long a suspect member has to refute before it is declared down
    #[arg(long, env = "LATTICED_SUSPECT_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub suspect_timeout: Duration,

    /// SWIM: how long a down (or left) member is still reported before it is forgotten; until
    /// then a down member counts in N for MAJORITY / ALL writes
    #[arg(long, env = "LATTICED_REMOVE_DOWN_AFTER", default_value = "15m", value_parser = parse_duration)]
    pub remove_down_after: Duration,

    /// Replication: how long local deltas are gathered, at most, before they are pushed to a
    /// peer that has deltas in flight (a peer with nothing in flight gets a write at once);
    /// with --data-dir also how often a busy node commits: once per window on average, never
    /// twice within half a window (a quiet node commits at once)
    #[arg(long, env = "LATTICED_BATCH_WINDOW", default_value = "2ms", value_parser = parse_duration)]
    pub batch_window: Duration,

    /// Replication: how often this node compares digests with one random peer (anti-entropy)
    #[arg(long, env = "LATTICED_ANTI_ENTROPY_INTERVAL", default_value = "300ms", value_parser = parse_duration)]
    pub anti_entropy_interval: Duration,

    /// How long a MAJORITY or ALL write waits for acks before it fails
    #[arg(long, env = "LATTICED_WRITE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Bound of the delta buffer in bytes; a peer that falls further behind gets full states
    #[arg(long, env = "LATTICED_DELTA_BUFFER_BYTES", default_value_t = 16 << 20)]
    pub delta_buffer_bytes: usize,

    /// How long a deleted key's tombstone is kept (default: forever, as the reference proxy).
    /// After it, the key may be written again, and a peer that missed the delete for that long
    /// may bring the old value back
    #[arg(long, env = "LATTICED_TOMBSTONE_TTL", value_parser = parse_duration)]
    pub tombstone_ttl: Option<Duration>,

    /// Folder for this node's durable state (every key's value and tombstone, its replica id),
    /// created if missing: a restarted node resumes with its data (as the same replica after
    /// a clean shutdown, as a fresh one after a crash), and a write is on disk before it is
    /// acknowledged to a client or a peer. One node per folder; a
    /// second process on it waits until the first exits. Without it, state is in memory only
    /// and a restarted node starts empty, as a new replica
    #[arg(long, env = "LATTICED_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Replicate every write as the key's full state instead of a delta (for comparison in
    /// benchmarks; never faster)
    #[arg(long, env = "LATTICED_REPLICATE_FULL_STATE", hide = true)]
    pub replicate_full_state: bool,

    /// On SIGTERM/SIGINT: how long commands in flight get to finish (new ones are refused with
    /// UNAVAILABLE) and entities to passivate; then the node leaves (within 2 s more)
    #[arg(long, env = "LATTICED_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format (the level comes from RUST_LOG, default info)
    #[arg(long, env = "LATTICED_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The longest duration a flag accepts (longer ones would overflow clock arithmetic).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses `250ms`, `2s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 250ms, 2s, 5m or 1h"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{s}` (use ms, s, m or h)"
            ))
        }
    };
    if d > MAX_DURATION {
        return Err(format!(
            "`{s}` is longer than the largest duration accepted (10 years)"
        ));
    }
    Ok(d)
}

impl RunArgs {
    /// The node name: the flag, else the host name, else `latticed`.
    pub fn resolved_node_name(&self) -> String {
        if let Some(n) = &self.node_name {
            return n.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "latticed".to_string())
    }

    /// The user functions to serve: the flag, else `USER_FUNCTION_HOST`/`USER_FUNCTION_PORT`
    /// (default 127.0.0.1:8080); `none` means none.
    pub fn user_functions(&self) -> Vec<String> {
        if self.user_function.iter().any(|u| u == "none") {
            return Vec::new();
        }
        if !self.user_function.is_empty() {
            return self.user_function.clone();
        }
        let host = std::env::var("USER_FUNCTION_HOST").unwrap_or_else(|_| "127.0.0.1".into());
        let port = std::env::var("USER_FUNCTION_PORT").unwrap_or_else(|_| "8080".into());
        vec![format!("{host}:{port}")]
    }

    /// Whether the node is configured to find peers.
    pub fn has_peers(&self) -> bool {
        !self.join.is_empty() || !self.join_dns.is_empty()
    }

    /// Checks what clap cannot: the name, the TLS choice, the advertised address.
    pub fn validate(&self) -> Result<(), DaemonError> {
        let name = self.resolved_node_name();
        if name.is_empty() || name.len() > 253 {
            return Err(DaemonError::Config(
                "--node-name must be 1 to 253 characters".into(),
            ));
        }
        if self.has_peers() && self.ca_cert.is_none() {
            return Err(DaemonError::Config(
                "--join/--join-dns need --ca-cert, --cert and --key: a cluster never runs \
                 without mutual TLS (create them with `latticed certs init` and `latticed certs issue`)"
                    .into(),
            ));
        }
        if self.has_peers()
            && self.advertise_addr.is_none()
            && self.cluster_addr.ip().is_unspecified()
        {
            return Err(DaemonError::Config(format!(
                "--cluster-addr {} is a wildcard address: set --advertise-addr to the address \
                 peers should use to reach this node",
                self.cluster_addr
            )));
        }
        if self.probe_period.is_zero() || self.suspect_timeout.is_zero() {
            return Err(DaemonError::Config(
                "--probe-period and --suspect-timeout must be above zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(
            parse_duration("99999999999h").is_err(),
            "absurd durations are refused"
        );
    }

    #[test]
    fn joining_without_certificates_is_refused() {
        let cli =
            Cli::try_parse_from(["latticed", "--node-name", "n1", "--join", "127.0.0.1:7000"])
                .unwrap();
        let err = cli.run.validate().unwrap_err().to_string();
        assert!(err.contains("mutual TLS"), "{err}");
    }

    #[test]
    fn run_is_the_default_subcommand() {
        let cli = Cli::try_parse_from(["latticed", "--node-name", "n1"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.node_name.as_deref(), Some("n1"));
        let cli = Cli::try_parse_from(["latticed", "run", "--node-name", "n2"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Run(r)) if r.node_name.as_deref() == Some("n2"))
        );
    }

    #[test]
    fn register_takes_the_daemon_the_address_and_a_ttl() {
        let cli = Cli::try_parse_from([
            "latticed",
            "register",
            "--latticed",
            "10.0.0.1:9000",
            "--address",
            "10.244.1.7:8080",
        ])
        .unwrap();
        let Some(Command::Register(a)) = cli.command else {
            panic!("not register")
        };
        assert_eq!(a.latticed, "10.0.0.1:9000");
        assert_eq!(a.address, "10.244.1.7:8080");
        assert_eq!(a.ttl, Duration::from_secs(60));
        assert!(a.token_file.is_none());
        // both addresses are required
        assert!(Cli::try_parse_from(["latticed", "register", "--latticed", "h:1"]).is_err());
    }

    #[test]
    fn check_uf_takes_an_address_and_its_flags() {
        let cli = Cli::try_parse_from([
            "latticed",
            "check-uf",
            "127.0.0.1:8080",
            "--timeout",
            "2s",
            "--json",
        ])
        .unwrap();
        let Some(Command::CheckUf(a)) = cli.command else {
            panic!("not check-uf")
        };
        assert_eq!(a.addr, "127.0.0.1:8080");
        assert_eq!(a.timeout, Duration::from_secs(2));
        assert!(a.json && a.service.is_none());
        for bad in [
            "localhost",
            "http://127.0.0.1:8080",
            "127.0.0.1:99999",
            ":8080",
        ] {
            assert!(
                Cli::try_parse_from(["latticed", "check-uf", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }
}
