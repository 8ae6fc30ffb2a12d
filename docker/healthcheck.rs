//! `latticed-healthcheck`: the image's HEALTHCHECK, for an image without a shell or curl.
//!
//! ```text
//! latticed-healthcheck [HOST:PORT]     (default: $LATTICED_ADMIN_ADDR, else 127.0.0.1:9099)
//! ```
//! GETs `/healthz` on the daemon's admin endpoint and exits 0 on `200`, else 1. A wildcard
//! admin address (`0.0.0.0:9099`, as the image sets) is probed on 127.0.0.1. Standard library
//! only: `docker/build-image` and the Dockerfile compile it with plain `rustc`, and it links the
//! same shared libraries as `latticed`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn probe(arg: Option<String>) -> Result<(), String> {
    let raw = arg
        .or_else(|| std::env::var("LATTICED_ADMIN_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:9099".into());
    let mut addr: SocketAddr = raw.parse().map_err(|e| format!("{raw}: {e}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut head = Vec::new();
    s.take(4096)
        .read_to_end(&mut head)
        .map_err(|e| format!("{addr}: {e}"))?;
    let line = String::from_utf8_lossy(&head);
    match line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!(
            "{addr}/healthz: {}",
            line.lines().next().unwrap_or("")
        )),
    }
}

fn main() -> ExitCode {
    match probe(std::env::args().nth(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latticed-healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}
