//! The HTTP/2 connections to one user function, shared by its entities' `handle` streams.
//!
//! Servers cap the streams one connection may carry (SETTINGS_MAX_CONCURRENT_STREAMS: Kestrel
//! 100, hyper 200, configurable everywhere); a stream beyond the cap waits for a free slot, so
//! with every entity on one connection the 101st entity would wait until another one
//! passivates. The pool hands each new stream the first connection with room and opens another
//! one when all carry `streams_per_connection` streams (the server's own
//! SETTINGS_MAX_CONCURRENT_STREAMS, read at discovery, or `--user-function-streams-per-connection`,
//! 100 by default, if lower). It owns the connections and their stream counts; it does not know the
//! CloudState protocol.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tonic::transport::{Channel, Endpoint};

/// The connections to one user function.
pub struct ConnectionPool {
    endpoint: Endpoint,
    streams_per_connection: usize,
    connections: Mutex<Vec<Connection>>,
}

#[derive(Clone)]
struct Connection {
    channel: Channel,
    streams: Arc<AtomicUsize>,
}

/// One stream's place on a connection, given back when dropped.
pub struct Lease {
    /// the connection to open the stream on
    pub channel: Channel,
    streams: Arc<AtomicUsize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionPool {
    /// A pool for the user function at `addr` (connections open on first use).
    pub fn new(addr: &str, streams_per_connection: usize) -> Result<Self, tonic::transport::Error> {
        Ok(ConnectionPool {
            endpoint: Endpoint::from_shared(format!("http://{addr}"))?,
            streams_per_connection: streams_per_connection.max(1),
            connections: Mutex::new(Vec::new()),
        })
    }

    /// A place for one more stream: on the first connection with room (so that extra
    /// connections empty out and close), else on a new connection.
    pub fn lease(&self) -> Lease {
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let with_room = conns
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < self.streams_per_connection)
            .cloned();
        let conn = match with_room {
            Some(c) => c,
            None => {
                // idle extra connections are closed again as their streams end (below)
                let c = Connection {
                    channel: self.endpoint.connect_lazy(),
                    streams: Arc::new(AtomicUsize::new(0)),
                };
                conns.push(c.clone());
                c
            }
        };
        // connections beyond the first that carry nothing are dropped
        let mut kept_first = false;
        conns.retain(|c| {
            let keep = !kept_first
                || c.streams.load(Ordering::Relaxed) > 0
                || Arc::ptr_eq(&c.streams, &conn.streams);
            kept_first = true;
            keep
        });
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Lease {
            channel: conn.channel,
            streams: conn.streams,
        }
    }

    /// How many connections are open (or opening).
    pub fn connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_full_connection_gets_a_neighbour_and_empty_ones_go() {
        let pool = ConnectionPool::new("127.0.0.1:1", 2).unwrap();
        let a = pool.lease();
        let b = pool.lease();
        assert_eq!(pool.connections(), 1);
        let c = pool.lease();
        assert_eq!(pool.connections(), 2, "the first connection is full");
        drop(c);
        drop(a);
        // the second connection is empty: it goes at the next lease, which fits the first
        let d = pool.lease();
        assert_eq!(pool.connections(), 1);
        drop((b, d));
    }
}
