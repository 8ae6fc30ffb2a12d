//! The peer encoding written straight from a value, without building its protobuf messages.
//!
//! [`super::to_proto`] builds a `pb::Value` first: a `String` and a `Bytes` copy per element, a
//! `Vec` per dot list, all freed again once encoded (prost also clones each `Bytes` it
//! writes). For the values the data file and anti-entropy encode whole (a set of 10k elements
//! and more) that allocation was most of the encoding's cost. This writes the same bytes
//! directly with prost's own primitives (`prost::encoding`: keys, varints), and computes a
//! value's encoded length without writing it.
//!
//! The bytes must be exactly prost's (digests hash them, and the file and peers decode them
//! with prost): proto3 rules, as prost applies them: fields in field-number order; a scalar
//! equal to its default (0, `false`, empty) is left out; a message field that `to_proto` sets
//! is written even when empty; a repeated message field writes one length-delimited record per
//! element. Tests compare both encoders on arbitrary values of every type.
//!
//! This module owns the direct writer and nothing else: the message layout is
//! `proto/latticed/crdt.proto`'s, and the mapping of a value onto it is [`super::to_proto`]'s,
//! which this mirrors field for field.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use crate::context::{CausalContext, Dot};
use crate::counter::CounterStore;
use crate::dotstore::DotSet;
use crate::element::Element;
use crate::map::MapStore;
use crate::register::RegisterStore;
use crate::set::ElementSet;
use crate::value::{CrdtValue, Store};
use crate::vote::VoteStore;

/// Appends the encoding of `v` to `buf` (the bytes of `to_proto(v).encode_to_vec()`).
pub fn encode_into(v: &CrdtValue, buf: &mut Vec<u8>) {
    let m = ValueMsg(v);
    buf.reserve(m.body_len());
    m.write_body(buf);
}

/// The length of `v`'s encoding.
pub fn encoded_len(v: &CrdtValue) -> usize {
    ValueMsg(v).body_len()
}

/// A message: its body's length and its body.
trait Msg {
    fn body_len(&self) -> usize;
    fn write_body(&self, buf: &mut Vec<u8>);
}

fn message_len(tag: u32, m: &(impl Msg + ?Sized)) -> usize {
    let len = m.body_len();
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn message(tag: u32, m: &(impl Msg + ?Sized), buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(m.body_len() as u64, buf);
    m.write_body(buf);
}

fn repeated_len<M: Msg>(tag: u32, items: impl Iterator<Item = M>) -> usize {
    items.map(|m| message_len(tag, &m)).sum()
}

fn repeated<M: Msg>(tag: u32, items: impl Iterator<Item = M>, buf: &mut Vec<u8>) {
    for m in items {
        message(tag, &m, buf);
    }
}

fn uint64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn uint64(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

fn fixed64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + 8
    }
}

fn fixed64(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn bool_len(tag: u32, v: bool) -> usize {
    if v {
        key_len(tag) + 1
    } else {
        0
    }
}

fn boolean(tag: u32, v: bool, buf: &mut Vec<u8>) {
    if v {
        encode_key(tag, WireType::Varint, buf);
        buf.push(1);
    }
}

fn bytes_len(tag: u32, v: &[u8]) -> usize {
    if v.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(v.len() as u64) + v.len()
    }
}

fn bytes(tag: u32, v: &[u8], buf: &mut Vec<u8>) {
    if !v.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(v.len() as u64, buf);
        buf.extend_from_slice(v);
    }
}

/// `Dot { fixed64 replica = 1; uint64 counter = 2; }` (also the shape of the first two fields
/// of `CounterEntry` and `VoteEntry`).
struct DotMsg(u64, u64);

impl DotMsg {
    fn of(d: &Dot) -> DotMsg {
        DotMsg(d.actor, d.counter)
    }
}

impl Msg for DotMsg {
    fn body_len(&self) -> usize {
        fixed64_len(1, self.0) + uint64_len(2, self.1)
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        fixed64(1, self.0, buf);
        uint64(2, self.1, buf);
    }
}

fn dots(ds: &DotSet) -> impl Iterator<Item = DotMsg> + '_ {
    ds.iter().map(DotMsg::of)
}

/// `Element { string type_url = 1; bytes value = 2; }`
struct ElementMsg<'a>(&'a Element);

impl Msg for ElementMsg<'_> {
    fn body_len(&self) -> usize {
        bytes_len(1, self.0.type_url().as_bytes()) + bytes_len(2, self.0.value())
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        bytes(1, self.0.type_url().as_bytes(), buf);
        bytes(2, self.0.value(), buf);
    }
}

/// `Value { Store store = 1; CausalContext context = 2; bool delta = 3; }`
struct ValueMsg<'a>(&'a CrdtValue);

impl Msg for ValueMsg<'_> {
    fn body_len(&self) -> usize {
        message_len(1, &StoreMsg(&self.0.store))
            + message_len(2, &ContextMsg(&self.0.ctx))
            + bool_len(3, self.0.delta)
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        message(1, &StoreMsg(&self.0.store), buf);
        message(2, &ContextMsg(&self.0.ctx), buf);
        boolean(3, self.0.delta, buf);
    }
}

/// `CausalContext { repeated Dot version = 1; repeated Dot cloud = 2; }`
struct ContextMsg<'a>(&'a CausalContext);

impl ContextMsg<'_> {
    fn version(&self) -> impl Iterator<Item = DotMsg> + '_ {
        self.0.version().map(|(r, c)| DotMsg(r, c))
    }
    fn cloud(&self) -> impl Iterator<Item = DotMsg> + '_ {
        self.0.cloud().map(DotMsg::of)
    }
}

impl Msg for ContextMsg<'_> {
    fn body_len(&self) -> usize {
        repeated_len(1, self.version()) + repeated_len(2, self.cloud())
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        repeated(1, self.version(), buf);
        repeated(2, self.cloud(), buf);
    }
}

/// `Store { oneof kind { ... } }`: the variant's message under its field number.
struct StoreMsg<'a>(&'a Store);

impl StoreMsg<'_> {
    /// Calls `f` with the variant's field number and message.
    fn with<R>(&self, f: impl FnOnce(u32, &dyn Msg) -> R) -> R {
        match self.0 {
            Store::GCounter(c) => f(1, &CounterMsg(&c.0)),
            Store::PNCounter(c) => f(2, &CounterMsg(&c.0)),
            Store::GSet(x) => f(3, &SetMsg(&x.0)),
            Store::ORSet(x) => f(4, &SetMsg(&x.0)),
            Store::LwwRegister(r) => f(5, &RegisterMsg(r)),
            Store::Flag(d) => f(6, &DotSetMsg(d)),
            Store::ORMap(m) => f(7, &MapMsg(m)),
            Store::Vote(v) => f(8, &VoteMsg(v)),
        }
    }
}

impl Msg for StoreMsg<'_> {
    fn body_len(&self) -> usize {
        self.with(|tag, m| message_len(tag, m))
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        self.with(|tag, m| message(tag, m, buf))
    }
}

/// `Counter { repeated CounterEntry entries = 1; }`
struct CounterMsg<'a>(&'a CounterStore);

/// `CounterEntry { fixed64 replica = 1; uint64 counter = 2; uint64 increments = 3;
/// uint64 decrements = 4; }`
struct CounterEntryMsg(DotMsg, u64, u64);

impl Msg for CounterEntryMsg {
    fn body_len(&self) -> usize {
        self.0.body_len() + uint64_len(3, self.1) + uint64_len(4, self.2)
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        self.0.write_body(buf);
        uint64(3, self.1, buf);
        uint64(4, self.2, buf);
    }
}

impl CounterMsg<'_> {
    fn entries(&self) -> impl Iterator<Item = CounterEntryMsg> + '_ {
        self.0
            .iter()
            .map(|(d, (inc, dec))| CounterEntryMsg(DotMsg::of(d), *inc, *dec))
    }
}

impl Msg for CounterMsg<'_> {
    fn body_len(&self) -> usize {
        repeated_len(1, self.entries())
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        repeated(1, self.entries(), buf)
    }
}

/// `ElementSet { repeated SetEntry entries = 1; }`
struct SetMsg<'a>(&'a ElementSet);

/// `SetEntry { Element element = 1; repeated Dot dots = 2; }`
struct SetEntryMsg<'a>(&'a Element, &'a DotSet);

impl Msg for SetEntryMsg<'_> {
    fn body_len(&self) -> usize {
        message_len(1, &ElementMsg(self.0)) + repeated_len(2, dots(self.1))
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        message(1, &ElementMsg(self.0), buf);
        repeated(2, dots(self.1), buf);
    }
}

impl Msg for SetMsg<'_> {
    fn body_len(&self) -> usize {
        repeated_len(1, self.0.iter().map(|(e, ds)| SetEntryMsg(e, ds)))
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        repeated(1, self.0.iter().map(|(e, ds)| SetEntryMsg(e, ds)), buf)
    }
}

/// `Register { repeated RegisterEntry entries = 1; }`
struct RegisterMsg<'a>(&'a RegisterStore);

/// `RegisterEntry { Dot dot = 1; sint64 clock = 2; Element value = 3; }`
struct RegisterEntryMsg<'a>(&'a Dot, i64, &'a Element);

impl Msg for RegisterEntryMsg<'_> {
    fn body_len(&self) -> usize {
        message_len(1, &DotMsg::of(self.0))
            + uint64_len(2, zigzag(self.1))
            + message_len(3, &ElementMsg(self.2))
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        message(1, &DotMsg::of(self.0), buf);
        uint64(2, zigzag(self.1), buf);
        message(3, &ElementMsg(self.2), buf);
    }
}

impl Msg for RegisterMsg<'_> {
    fn body_len(&self) -> usize {
        repeated_len(
            1,
            self.0.iter().map(|(d, (c, v))| RegisterEntryMsg(d, *c, v)),
        )
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        repeated(
            1,
            self.0.iter().map(|(d, (c, v))| RegisterEntryMsg(d, *c, v)),
            buf,
        )
    }
}

/// `DotSet { repeated Dot dots = 1; }`
struct DotSetMsg<'a>(&'a DotSet);

impl Msg for DotSetMsg<'_> {
    fn body_len(&self) -> usize {
        repeated_len(1, dots(self.0))
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        repeated(1, dots(self.0), buf)
    }
}

/// `Map { repeated MapEntry entries = 1; }`
struct MapMsg<'a>(&'a MapStore);

/// `MapEntry { Element key = 1; Store value = 2; repeated Dot presence = 3; }`
struct MapEntryMsg<'a>(&'a Element, &'a Store, &'a DotSet);

impl Msg for MapEntryMsg<'_> {
    fn body_len(&self) -> usize {
        message_len(1, &ElementMsg(self.0))
            + message_len(2, &StoreMsg(self.1))
            + repeated_len(3, dots(self.2))
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        message(1, &ElementMsg(self.0), buf);
        message(2, &StoreMsg(self.1), buf);
        repeated(3, dots(self.2), buf);
    }
}

impl MapMsg<'_> {
    fn entries(&self) -> impl Iterator<Item = MapEntryMsg<'_>> + '_ {
        self.0
            .iter()
            .map(|(k, e)| MapEntryMsg(&k.key, &e.value, &e.presence))
    }
}

impl Msg for MapMsg<'_> {
    fn body_len(&self) -> usize {
        repeated_len(1, self.entries())
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        repeated(1, self.entries(), buf)
    }
}

/// `Vote { repeated VoteEntry entries = 1; }`
struct VoteMsg<'a>(&'a VoteStore);

/// `VoteEntry { fixed64 replica = 1; uint64 counter = 2; bool vote = 3; }`
struct VoteEntryMsg(DotMsg, bool);

impl Msg for VoteEntryMsg {
    fn body_len(&self) -> usize {
        self.0.body_len() + bool_len(3, self.1)
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        self.0.write_body(buf);
        boolean(3, self.1, buf);
    }
}

impl VoteMsg<'_> {
    fn entries(&self) -> impl Iterator<Item = VoteEntryMsg> + '_ {
        self.0.iter().map(|(d, v)| VoteEntryMsg(DotMsg::of(d), *v))
    }
}

impl Msg for VoteMsg<'_> {
    fn body_len(&self) -> usize {
        repeated_len(1, self.entries())
    }
    fn write_body(&self, buf: &mut Vec<u8>) {
        repeated(1, self.entries(), buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::causal::Causal;
    use crate::context::dot;
    use crate::counter::{GCounterStore, PNCounterStore};
    use crate::dotstore::DotFun;
    use crate::map::{MapEntry, MapKey};
    use crate::set::{GSetStore, ORSetStore};
    use crate::wire::to_proto;
    use crate::CrdtKind;
    use proptest::prelude::*;
    use prost::Message;

    /// Numbers at the edges of every encoding: 0 (left out), one and many varint bytes, and
    /// the largest.
    fn num() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(127),
            Just(128),
            Just(u64::MAX),
            any::<u64>()
        ]
    }

    fn a_dot() -> impl Strategy<Value = Dot> {
        (num(), num().prop_map(|c| c.max(1))).prop_map(|(r, c)| dot(r, c))
    }

    fn a_dot_set() -> impl Strategy<Value = DotSet> {
        prop::collection::vec(a_dot(), 0..4).prop_map(DotSet::from_dots)
    }

    fn an_element() -> impl Strategy<Value = Element> {
        (
            prop_oneof![
                Just(String::new()),
                Just("type.googleapis.com/x".to_string()),
                ".{0,3}"
            ],
            prop::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(|(t, v)| Element::new(&t, v))
    }

    fn a_store(depth: u32) -> BoxedStrategy<Store> {
        let counter = || {
            prop::collection::vec((a_dot(), num(), num()), 0..4).prop_map(|es| {
                let mut c = CounterStore::default();
                for (d, i, dec) in es {
                    c.insert(d, (i, dec));
                }
                c
            })
        };
        let set = || {
            prop::collection::vec((an_element(), a_dot_set()), 0..4).prop_map(|es| {
                let mut s = ElementSet::default();
                for (e, ds) in es {
                    s.insert(e, ds);
                }
                s
            })
        };
        let leaf = prop_oneof![
            counter().prop_map(|c| Store::GCounter(GCounterStore(c))),
            counter().prop_map(|c| Store::PNCounter(PNCounterStore(c))),
            set().prop_map(|s| Store::GSet(GSetStore(s))),
            set().prop_map(|s| Store::ORSet(ORSetStore(s))),
            prop::collection::vec((a_dot(), any::<i64>(), an_element()), 0..3).prop_map(|es| {
                let mut r = DotFun::default();
                for (d, c, e) in es {
                    r.insert(d, (c, e));
                }
                Store::LwwRegister(r)
            }),
            a_dot_set().prop_map(Store::Flag),
            prop::collection::vec((a_dot(), any::<bool>()), 0..4).prop_map(|es| {
                let mut v = DotFun::default();
                for (d, b) in es {
                    v.insert(d, b);
                }
                Store::Vote(v)
            }),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        let map = prop::collection::vec((an_element(), a_store(depth - 1), a_dot_set()), 0..3)
            .prop_map(|es| {
                let mut m = MapStore::default();
                for (key, value, presence) in es {
                    let kind: CrdtKind = value.kind();
                    m.insert(MapKey { key, kind }, MapEntry { presence, value });
                }
                Store::ORMap(m)
            });
        prop_oneof![leaf, map].boxed()
    }

    fn a_value() -> impl Strategy<Value = CrdtValue> {
        (
            a_store(2),
            prop::collection::vec((num(), num()), 0..3),
            prop::collection::vec(a_dot(), 0..3),
            any::<bool>(),
        )
            .prop_map(|(store, version, cloud, delta)| {
                let ctx = CausalContext::from_parts(version, cloud);
                if delta {
                    Causal::from_delta_parts(store, ctx)
                } else {
                    Causal::from_state_parts(store, ctx)
                }
            })
    }

    proptest! {
        #[test]
        fn writes_exactly_what_prost_writes(v in a_value()) {
            let expected = to_proto(&v).encode_to_vec();
            let mut written = vec![7u8];
            encode_into(&v, &mut written);
            prop_assert_eq!(&written[1..], &expected[..], "appended after what the buffer held");
            prop_assert_eq!(encoded_len(&v), expected.len());
        }
    }
}
