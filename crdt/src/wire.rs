//! latticed's peer encoding of values and deltas (`proto/latticed/crdt.proto`).
//!
//! Encoding is total. Decoding trusts nothing: a missing store, a zero dot, a map entry without
//! a key or value are errors; prost bounds nesting depth and never allocates more than the input
//! implies. A decoded full state is normalised (entries holding nothing are dropped), so a peer
//! cannot plant empty entries. This module owns the mapping and nothing else.

use bytes::Bytes;
use latticed_proto::latticed::crdt as pb;
use prost::Message;

use crate::causal::Causal;
use crate::context::{dot, CausalContext, Dot};
use crate::counter::{CounterStore, GCounterStore, PNCounterStore};
use crate::dotstore::{DotFun, DotSet};
use crate::element::Element;
use crate::error::{CrdtError, Result};
use crate::map::{MapEntry, MapKey, MapStore};
use crate::register::RegisterStore;
use crate::set::{ElementSet, GSetStore, ORSetStore};
use crate::value::{CrdtValue, Store};
use crate::vote::VoteStore;

mod encoder;

pub use encoder::{encode_into, encoded_len};

/// Encodes a value or delta to bytes: the bytes of [`to_proto`]'s message, written directly
/// ([`encode_into`]).
pub fn encode(v: &CrdtValue) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(v, &mut buf);
    buf
}

/// Decodes bytes from a peer.
pub fn decode(bytes: &[u8]) -> Result<CrdtValue> {
    let p = pb::Value::decode(bytes).map_err(|e| CrdtError::Decode(e.to_string()))?;
    from_proto(&p)
}

/// A value or delta as its protobuf message.
pub fn to_proto(v: &CrdtValue) -> pb::Value {
    pb::Value {
        store: Some(store_to_proto(&v.store)),
        context: Some(pb::CausalContext {
            version: v
                .ctx
                .version()
                .map(|(r, c)| dot_to_proto(&dot(r, c)))
                .collect(),
            cloud: v.ctx.cloud().map(dot_to_proto).collect(),
        }),
        delta: v.delta,
    }
}

/// A value or delta from its protobuf message, validated.
pub fn from_proto(p: &pb::Value) -> Result<CrdtValue> {
    let store = store_from_proto(p.store.as_ref().ok_or_else(|| missing("store"))?)?;
    let ctx = match &p.context {
        None => CausalContext::new(),
        Some(c) => CausalContext::from_parts(
            c.version
                .iter()
                .map(|d| dot_from_proto(d).map(|d| (d.actor, d.counter)))
                .collect::<Result<Vec<_>>>()?,
            c.cloud
                .iter()
                .map(dot_from_proto)
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    Ok(if p.delta {
        Causal::from_delta_parts(store, ctx)
    } else {
        Causal::from_state_parts(store, ctx)
    })
}

fn missing(what: &str) -> CrdtError {
    CrdtError::Decode(format!("missing {what}"))
}

fn dot_to_proto(d: &Dot) -> pb::Dot {
    pb::Dot {
        replica: d.actor,
        counter: d.counter,
    }
}

fn dot_from_proto(d: &pb::Dot) -> Result<Dot> {
    if d.counter == 0 {
        return Err(CrdtError::Decode("dot with counter 0".into()));
    }
    Ok(dot(d.replica, d.counter))
}

fn dots_from_proto(ds: &[pb::Dot]) -> Result<DotSet> {
    Ok(DotSet::from_dots(
        ds.iter().map(dot_from_proto).collect::<Result<_>>()?,
    ))
}

fn element_to_proto(e: &Element) -> pb::Element {
    pb::Element {
        type_url: e.type_url().to_string(),
        value: Bytes::copy_from_slice(e.value()),
    }
}

fn element_from_proto(e: Option<&pb::Element>) -> Result<Element> {
    let e = e.ok_or_else(|| missing("element"))?;
    Ok(Element::new(&e.type_url, &e.value[..]))
}

fn counter_to_proto(s: &CounterStore) -> pb::Counter {
    pb::Counter {
        entries: s
            .iter()
            .map(|(d, (inc, dec))| pb::CounterEntry {
                replica: d.actor,
                counter: d.counter,
                increments: *inc,
                decrements: *dec,
            })
            .collect(),
    }
}

fn counter_from_proto(c: &pb::Counter) -> Result<CounterStore> {
    let mut s = CounterStore::default();
    for e in &c.entries {
        let d = dot_from_proto(&pb::Dot {
            replica: e.replica,
            counter: e.counter,
        })?;
        s.insert(d, (e.increments, e.decrements));
    }
    Ok(s)
}

fn set_to_proto(s: &ElementSet) -> pb::ElementSet {
    pb::ElementSet {
        entries: s
            .iter()
            .map(|(e, ds)| pb::SetEntry {
                element: Some(element_to_proto(e)),
                dots: ds.iter().map(dot_to_proto).collect(),
            })
            .collect(),
    }
}

fn set_from_proto(s: &pb::ElementSet) -> Result<ElementSet> {
    let mut out = ElementSet::default();
    for e in &s.entries {
        out.insert(
            element_from_proto(e.element.as_ref())?,
            dots_from_proto(&e.dots)?,
        );
    }
    Ok(out)
}

fn store_to_proto(s: &Store) -> pb::Store {
    use pb::store::Kind;
    let kind = match s {
        Store::GCounter(c) => Kind::Gcounter(counter_to_proto(&c.0)),
        Store::PNCounter(c) => Kind::Pncounter(counter_to_proto(&c.0)),
        Store::GSet(x) => Kind::Gset(set_to_proto(&x.0)),
        Store::ORSet(x) => Kind::Orset(set_to_proto(&x.0)),
        Store::LwwRegister(r) => Kind::Lwwregister(pb::Register {
            entries: r
                .iter()
                .map(|(d, (clock, v))| pb::RegisterEntry {
                    dot: Some(dot_to_proto(d)),
                    clock: *clock,
                    value: Some(element_to_proto(v)),
                })
                .collect(),
        }),
        Store::Flag(f) => Kind::Flag(pb::DotSet {
            dots: f.iter().map(dot_to_proto).collect(),
        }),
        Store::ORMap(m) => Kind::Ormap(pb::Map {
            entries: m
                .iter()
                .map(|(k, e)| pb::MapEntry {
                    key: Some(element_to_proto(&k.key)),
                    value: Some(store_to_proto(&e.value)),
                    presence: e.presence.iter().map(dot_to_proto).collect(),
                })
                .collect(),
        }),
        Store::Vote(v) => Kind::Vote(pb::Vote {
            entries: v
                .iter()
                .map(|(d, vote)| pb::VoteEntry {
                    replica: d.actor,
                    counter: d.counter,
                    vote: *vote,
                })
                .collect(),
        }),
    };
    pb::Store { kind: Some(kind) }
}

fn store_from_proto(s: &pb::Store) -> Result<Store> {
    use pb::store::Kind;
    Ok(
        match s.kind.as_ref().ok_or_else(|| missing("store type"))? {
            Kind::Gcounter(c) => Store::GCounter(GCounterStore(counter_from_proto(c)?)),
            Kind::Pncounter(c) => Store::PNCounter(PNCounterStore(counter_from_proto(c)?)),
            Kind::Gset(x) => Store::GSet(GSetStore(set_from_proto(x)?)),
            Kind::Orset(x) => Store::ORSet(ORSetStore(set_from_proto(x)?)),
            Kind::Lwwregister(r) => {
                let mut out = RegisterStore::default();
                for e in &r.entries {
                    let d = dot_from_proto(e.dot.as_ref().ok_or_else(|| missing("dot"))?)?;
                    out.insert(d, (e.clock, element_from_proto(e.value.as_ref())?));
                }
                Store::LwwRegister(out)
            }
            Kind::Flag(f) => Store::Flag(dots_from_proto(&f.dots)?),
            Kind::Ormap(m) => {
                let mut out = MapStore::default();
                for e in &m.entries {
                    let value =
                        store_from_proto(e.value.as_ref().ok_or_else(|| missing("map value"))?)?;
                    let key = MapKey {
                        key: element_from_proto(e.key.as_ref())?,
                        kind: value.kind(),
                    };
                    out.insert(
                        key,
                        MapEntry {
                            presence: dots_from_proto(&e.presence)?,
                            value,
                        },
                    );
                }
                Store::ORMap(out)
            }
            Kind::Vote(v) => {
                let mut out: VoteStore = DotFun::default();
                for e in &v.entries {
                    let d = dot_from_proto(&pb::Dot {
                        replica: e.replica,
                        counter: e.counter,
                    })?;
                    out.insert(d, e.vote);
                }
                Store::Vote(out)
            }
        },
    )
}

/// A 64-bit digest of a value's content: equal values have equal digests, different ones
/// differ but for a hash collision. It is FNV-1a over the value's peer encoding ([`encode`]:
/// the bytes prost writes for [`to_proto`]), which is canonical: ordered maps are encoded in
/// order and fields in field order. Digests are compared between daemons, so they must not
/// depend on the compiler or the platform (`#[derive(Hash)]` promises neither); they do depend
/// on the encoding, which only ever gains fields. A mismatch would only cost anti-entropy a redundant exchange.
pub fn digest(v: &CrdtValue) -> u64 {
    let mut h = Fnv::new();
    h.write(&encode(v));
    h.finish()
}

/// FNV-1a, 64 bits, over bytes: the same on every platform, compiler and process.
pub struct Fnv(u64);

const FNV_PRIME: u64 = 0x0100_0000_01b3;

impl Fnv {
    /// A fresh hasher.
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    /// Hashes more bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }
    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, GSetDelta};

    #[test]
    fn fnv_is_fnv_1a() {
        // the published FNV-1a 64 test vectors
        for (input, expected) in [
            (&b""[..], 0xcbf2_9ce4_8422_2325),
            (b"a", 0xaf63_dc4c_8601_ec8c),
        ] {
            let mut h = Fnv::new();
            h.write(input);
            assert_eq!(h.finish(), expected);
        }
    }

    #[test]
    fn a_known_value_has_a_known_digest() {
        // pinned: a digest that changes splits anti-entropy between versions (every key would
        // compare as different, and be re-sent once)
        let mut v = None;
        let add = CrdtDelta {
            delta: Some(Delta::Gset(GSetDelta {
                added: vec![
                    crate::Element::string("a").to_any(),
                    crate::Element::string("b").to_any(),
                ],
            })),
        };
        crate::apply_user_delta(&mut v, &add, 7, 0).unwrap();
        let v = v.unwrap();
        assert_eq!(format!("{:#018x}", digest(&v)), "0x5663181eebf5a4b3");
    }
}
