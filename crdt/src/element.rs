//! `Element`: a CloudState `google.protobuf.Any` held inside a CRDT.
//!
//! Set elements, map keys and register values are opaque to latticed: they are kept as the exact
//! `(type_url, value bytes)` the user function sent, compared by those bytes, and never decoded
//! or re-encoded (protocol spec §5). This module owns that representation and nothing else.
//!
//! Memory: a 10k-element set of short strings is mostly type URLs, all equal. Type URLs are
//! therefore interned (shared `Arc<str>`), in a process-wide table bounded to
//! [`INTERN_LIMIT`] entries so that hostile input cannot grow it without bound; past the bound a
//! type URL is simply allocated on its own.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// How many distinct type URLs the intern table keeps at most.
pub const INTERN_LIMIT: usize = 4096;

/// The type URL of CloudState's primitive string encoding.
pub const STRING_TYPE_URL: &str = "p.cloudstate.io/string";

/// An opaque CloudState value: a type URL and the bytes of the encoded message, compared and
/// ordered by exactly those two things (type URL first).
///
/// Comparisons skip the type URLs' bytes when both are the same interned string (nearly every
/// comparison in a set's B-tree: its elements share one type URL), which comparing `Arc<str>`
/// by content would otherwise read each time.
#[derive(Clone)]
pub struct Element {
    type_url: Arc<str>,
    value: Box<[u8]>,
}

impl Element {
    fn same_type_url(&self, other: &Element) -> bool {
        Arc::ptr_eq(&self.type_url, &other.type_url) || self.type_url == other.type_url
    }
}

impl PartialEq for Element {
    fn eq(&self, other: &Element) -> bool {
        self.value == other.value && self.same_type_url(other)
    }
}

impl Eq for Element {}

impl Ord for Element {
    fn cmp(&self, other: &Element) -> std::cmp::Ordering {
        let type_url = if Arc::ptr_eq(&self.type_url, &other.type_url) {
            std::cmp::Ordering::Equal
        } else {
            self.type_url.cmp(&other.type_url)
        };
        type_url.then_with(|| self.value.cmp(&other.value))
    }
}

impl PartialOrd for Element {
    fn partial_cmp(&self, other: &Element) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::hash::Hash for Element {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.type_url.hash(state);
        self.value.hash(state);
    }
}

fn intern(type_url: &str) -> Arc<str> {
    static TABLE: OnceLock<Mutex<BTreeSet<Arc<str>>>> = OnceLock::new();
    let table = TABLE.get_or_init(|| Mutex::new(BTreeSet::new()));
    let mut table = table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(existing) = table.get(type_url) {
        return existing.clone();
    }
    let fresh: Arc<str> = Arc::from(type_url);
    if table.len() < INTERN_LIMIT {
        table.insert(fresh.clone());
    }
    fresh
}

impl Element {
    /// An element from a type URL and the encoded value, taken verbatim.
    pub fn new(type_url: &str, value: impl Into<Box<[u8]>>) -> Self {
        Element {
            type_url: intern(type_url),
            value: value.into(),
        }
    }

    /// The CloudState primitive encoding of a string (`p.cloudstate.io/string`, the bytes of a
    /// `google.protobuf.StringValue`; empty for `""`).
    pub fn string(s: &str) -> Self {
        let mut value = Vec::with_capacity(s.len() + 6);
        if !s.is_empty() {
            value.push(0x0a);
            let mut len = s.len() as u64;
            loop {
                let byte = (len & 0x7f) as u8;
                len >>= 7;
                if len == 0 {
                    value.push(byte);
                    break;
                }
                value.push(byte | 0x80);
            }
            value.extend_from_slice(s.as_bytes());
        }
        Element::new(STRING_TYPE_URL, value)
    }

    /// The type URL.
    pub fn type_url(&self) -> &str {
        &self.type_url
    }

    /// The encoded value bytes.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The string inside a `p.cloudstate.io/string` element, if it is one and decodes cleanly.
    pub fn as_string(&self) -> Option<&str> {
        if &*self.type_url != STRING_TYPE_URL {
            return None;
        }
        let bytes = &self.value[..];
        if bytes.is_empty() {
            return Some("");
        }
        if bytes[0] != 0x0a {
            return None;
        }
        let mut len: u64 = 0;
        let mut shift = 0;
        let mut i = 1;
        loop {
            let b = *bytes.get(i)?;
            len |= u64::from(b & 0x7f) << shift;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
        let rest = bytes.get(i..)?;
        if rest.len() as u64 != len {
            return None;
        }
        std::str::from_utf8(rest).ok()
    }

    /// The element as a protobuf `Any` (bytes copied verbatim).
    pub fn to_any(&self) -> prost_types::Any {
        prost_types::Any {
            type_url: self.type_url.to_string(),
            value: self.value.to_vec(),
        }
    }

    /// Heap bytes owned by this element (the value; the interned type URL is shared).
    pub fn heap_size(&self) -> usize {
        self.value.len()
    }
}

impl From<&prost_types::Any> for Element {
    fn from(any: &prost_types::Any) -> Self {
        Element::new(&any.type_url, any.value.as_slice())
    }
}

impl fmt::Debug for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_string() {
            Some(s) => write!(f, "{s:?}"),
            None => write!(f, "{}:{:02x?}", self.type_url, &self.value[..]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Order and equality are those of (type URL, value bytes), whether the type URLs are
        /// the same interned string or two copies of it.
        #[test]
        fn ordered_by_type_url_then_bytes(
            a in (0usize..3, proptest::collection::vec(0u8..3, 0..3), proptest::bool::ANY),
            b in (0usize..3, proptest::collection::vec(0u8..3, 0..3), proptest::bool::ANY),
        ) {
            const URLS: [&str; 3] = ["a", "b", STRING_TYPE_URL];
            let make = |(url, value, own): &(usize, Vec<u8>, bool)| {
                let mut e = Element::new(URLS[*url], value.clone());
                if *own {
                    e.type_url = Arc::from(URLS[*url]);
                }
                e
            };
            let (x, y) = (make(&a), make(&b));
            let tuple = |t: &(usize, Vec<u8>, bool)| (URLS[t.0], t.1.clone());
            proptest::prop_assert_eq!(x.cmp(&y), tuple(&a).cmp(&tuple(&b)));
            proptest::prop_assert_eq!(x == y, tuple(&a) == tuple(&b));
        }
    }

    #[test]
    fn string_encoding_matches_string_value() {
        assert_eq!(Element::string("").value(), b"");
        assert_eq!(Element::string("k1").value(), &[0x0a, 2, b'k', b'1']);
        assert_eq!(Element::string("k1").as_string(), Some("k1"));
        let long = "x".repeat(300);
        assert_eq!(Element::string(&long).as_string(), Some(long.as_str()));
    }

    #[test]
    fn compared_by_exact_bytes() {
        // node-support writes "" as 0a 00; Java writes nothing: two distinct elements.
        let java = Element::new(STRING_TYPE_URL, Vec::new());
        let node = Element::new(STRING_TYPE_URL, vec![0x0a, 0x00]);
        assert_ne!(java, node);
        assert_eq!(node.as_string(), Some(""));
        assert_ne!(Element::new("a", vec![1]), Element::new("b", vec![1]));
    }

    #[test]
    fn malformed_string_is_not_a_string() {
        assert_eq!(
            Element::new(STRING_TYPE_URL, vec![0x0a, 5, b'a']).as_string(),
            None
        );
        assert_eq!(
            Element::new(STRING_TYPE_URL, vec![0x0a, 0xff]).as_string(),
            None
        );
        assert_eq!(Element::new("other", vec![]).as_string(), None);
    }
}
