//! `netdelay`: holds every packet of an NFQUEUE queue for a fixed time, then accepts it.
//!
//! ```text
//! netdelay QUEUE DELAY_MS
//! ```
//! The kernel here has no `tc netem` and nftables cannot delay, but it has NFQUEUE (the
//! iptables target, through nft's xtables compatibility): a rule such as
//! `iptables -A INPUT -p udp --dport 7946 -j NFQUEUE --queue-num 0 --queue-bypass` hands each
//! matching packet to the program bound to queue 0 of that network namespace, which gives the
//! verdict. This one gives `NF_ACCEPT` DELAY_MS after it got the packet, so the packet goes on
//! unchanged (addresses, ports, payload), only late. Packets keep their order.
//!
//! The multi-host suite runs it in the fault helper image (`docker/build-fault-image`), in a
//! container that shares a node's network namespace and has NET_ADMIN. Standard library only
//! (the netlink calls are declared here: the C library is linked anyway), so it is compiled with
//! plain `rustc` like `docker/healthcheck.rs`. Readiness: the queue appears in
//! `/proc/net/netfilter/nfnetlink_queue` of the namespace once bound.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const AF_NETLINK: i32 = 16;
const AF_INET: u8 = 2;
const SOCK_RAW: i32 = 3;
const NETLINK_NETFILTER: i32 = 12;
const SOL_SOCKET: i32 = 1;
const SO_RCVBUF: i32 = 8;
const POLLIN: i16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
/// nfnetlink subsystem of the queue, in the high byte of the message type
const NFNL_SUBSYS_QUEUE: u16 = 3 << 8;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;

#[repr(C)]
struct SockaddrNl {
    family: u16,
    pad: u16,
    pid: u32,
    groups: u32,
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrNl, len: u32) -> i32;
    fn sendto(
        fd: i32,
        buf: *const u8,
        len: usize,
        flags: i32,
        to: *const SockaddrNl,
        tolen: u32,
    ) -> isize;
    fn recv(fd: i32, buf: *mut u8, len: usize, flags: i32) -> isize;
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const i32, len: u32) -> i32;
    fn poll(fds: *mut PollFd, n: u64, timeout_ms: i32) -> i32;
}

struct Queue {
    fd: i32,
    num: u16,
    seq: u32,
}

impl Queue {
    fn open(num: u16) -> Result<Queue, String> {
        // SAFETY: plain system calls on a socket this function owns; the address outlives them.
        unsafe {
            let fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
            if fd < 0 {
                return Err(format!(
                    "netlink socket: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let buf: i32 = 4 << 20;
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, 4);
            let me = SockaddrNl {
                family: AF_NETLINK as u16,
                pad: 0,
                pid: 0,
                groups: 0,
            };
            if bind(fd, &me, std::mem::size_of::<SockaddrNl>() as u32) < 0 {
                return Err(format!("netlink bind: {}", std::io::Error::last_os_error()));
            }
            let mut q = Queue { fd, num, seq: 0 };
            q.send(
                NFQNL_MSG_CONFIG,
                AF_INET,
                &[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, AF_INET])],
            )?;
            // copy no payload: the verdict needs only the packet id
            let params = [0, 0, 0, 0, NFQNL_COPY_META];
            let maxlen = 65_536u32.to_be_bytes();
            q.send(
                NFQNL_MSG_CONFIG,
                AF_INET,
                &[(NFQA_CFG_PARAMS, &params), (NFQA_CFG_QUEUE_MAXLEN, &maxlen)],
            )?;
            Ok(q)
        }
    }

    /// One nfnetlink message: header, `nfgenmsg` (family, version 0, queue number), attributes.
    fn send(&mut self, msg: u16, family: u8, attrs: &[(u16, &[u8])]) -> Result<(), String> {
        self.seq += 1;
        let mut body = vec![family, 0];
        body.extend_from_slice(&self.num.to_be_bytes());
        for (ty, value) in attrs {
            body.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&ty.to_ne_bytes());
            body.extend_from_slice(value);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&(NFNL_SUBSYS_QUEUE | msg).to_ne_bytes());
        out.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&body);
        let kernel = SockaddrNl {
            family: AF_NETLINK as u16,
            pad: 0,
            pid: 0,
            groups: 0,
        };
        // SAFETY: `out` and `kernel` live across the call.
        let sent = unsafe {
            sendto(
                self.fd,
                out.as_ptr(),
                out.len(),
                0,
                &kernel,
                std::mem::size_of::<SockaddrNl>() as u32,
            )
        };
        if sent < 0 {
            return Err(format!("netlink send: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn accept(&mut self, id: u32) -> Result<(), String> {
        let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        self.send(NFQNL_MSG_VERDICT, 0, &[(NFQA_VERDICT_HDR, &hdr)])
    }

    /// Waits up to `timeout` for messages; returns the ids of the packets they carry.
    fn receive(&mut self, timeout: Duration, buf: &mut [u8]) -> Result<Vec<u32>, String> {
        let mut pfd = PollFd {
            fd: self.fd,
            events: POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, 1000) as i32;
        // SAFETY: one pollfd, owned here.
        if unsafe { poll(&mut pfd, 1, ms) } <= 0 {
            return Ok(Vec::new());
        }
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { recv(self.fd, buf.as_mut_ptr(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // ENOBUFS: the socket overflowed; those packets are dropped, as on a real link
            return if e.raw_os_error() == Some(105) {
                Ok(Vec::new())
            } else {
                Err(format!("netlink recv: {e}"))
            };
        }
        let mut ids = Vec::new();
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(msgs[4..6].try_into().unwrap());
            if len < 16 || len > msgs.len() {
                break;
            }
            if ty == NLMSG_ERROR {
                let code = i32::from_ne_bytes(msgs[16..20].try_into().unwrap());
                if code != 0 {
                    return Err(format!("netlink error {code}"));
                }
            } else if ty == NFNL_SUBSYS_QUEUE | NFQNL_MSG_PACKET {
                // attributes after the 4-byte nfgenmsg
                let mut attrs = &msgs[20..len];
                while attrs.len() >= 4 {
                    let alen = u16::from_ne_bytes(attrs[0..2].try_into().unwrap()) as usize;
                    let aty = u16::from_ne_bytes(attrs[2..4].try_into().unwrap()) & 0x3fff;
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    if aty == NFQA_PACKET_HDR && alen >= 8 {
                        ids.push(u32::from_be_bytes(attrs[4..8].try_into().unwrap()));
                    }
                    attrs = &attrs[alen.next_multiple_of(4).min(attrs.len())..];
                }
            }
            msgs = &msgs[len.next_multiple_of(4).min(msgs.len())..];
        }
        Ok(ids)
    }
}

fn run(num: u16, delay: Duration) -> Result<(), String> {
    let mut q = Queue::open(num)?;
    eprintln!("netdelay: queue {num} bound, delaying by {delay:?}");
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let now = Instant::now();
        while let Some(&(due, id)) = held.front() {
            if due > now {
                break;
            }
            q.accept(id)?;
            held.pop_front();
        }
        let wait = held.front().map_or(Duration::from_secs(1), |(due, _)| {
            due.saturating_duration_since(now)
        });
        let ids = q.receive(wait, &mut buf)?;
        let due = Instant::now() + delay;
        held.extend(ids.into_iter().map(|id| (due, id)));
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [q, ms] => q.parse::<u16>().ok().zip(ms.parse::<u64>().ok()),
        _ => None,
    };
    let Some((num, ms)) = parsed else {
        eprintln!("usage: netdelay QUEUE DELAY_MS");
        return ExitCode::from(2);
    };
    match run(num, Duration::from_millis(ms)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netdelay: {e}");
            ExitCode::FAILURE
        }
    }
}
