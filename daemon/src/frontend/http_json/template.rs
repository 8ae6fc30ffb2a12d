//! `google.api.http` path templates: parsing, and matching a request path.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `{field}` is `{field=*}`: one segment. `**` matches any number of segments (zero included).
//! A variable's value is its segments, percent-decoded, joined with `/`.

/// One element of a flattened template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Elem {
    Literal(String),
    /// `*`: one segment
    Star,
    /// `**`: any number of segments
    DoubleStar,
    /// a variable's segments start here
    Start(usize),
    /// the variable's segments end here
    End(usize),
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    elems: Vec<Elem>,
    variables: Vec<Vec<String>>,
    verb: Option<String>,
}

impl Template {
    /// Parses a template; `Err` says what is wrong with it.
    pub fn parse(template: &str) -> Result<Template, String> {
        let bad = |why: &str| format!("path template {template:?}: {why}");
        let rest = template
            .strip_prefix('/')
            .ok_or_else(|| bad("it must start with /"))?;
        // the verb: a ':' after the last '/' and outside braces
        let mut depth = 0;
        let mut verb_at = None;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                '/' if depth == 0 => verb_at = None,
                ':' if depth == 0 => verb_at = Some(i),
                _ => {}
            }
        }
        let (segments, verb) = match verb_at {
            Some(i) => (&rest[..i], Some(rest[i + 1..].to_string())),
            None => (rest, None),
        };
        let mut t = Template {
            elems: Vec::new(),
            variables: Vec::new(),
            verb,
        };
        let mut chars = segments;
        while !chars.is_empty() {
            if let Some(var) = chars.strip_prefix('{') {
                let end = var.find('}').ok_or_else(|| bad("unclosed {"))?;
                let (path, pattern) = match var[..end].split_once('=') {
                    Some((p, pat)) => (p, pat),
                    None => (&var[..end], "*"),
                };
                if path.is_empty() || pattern.contains('{') {
                    return Err(bad("bad variable"));
                }
                let index = t.variables.len();
                t.variables
                    .push(path.split('.').map(|s| s.trim().to_string()).collect());
                t.elems.push(Elem::Start(index));
                for seg in pattern.split('/') {
                    t.elems
                        .push(segment(seg).ok_or_else(|| bad("empty or malformed segment"))?);
                }
                t.elems.push(Elem::End(index));
                chars = &var[end + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                t.elems
                    .push(segment(&chars[..end]).ok_or_else(|| bad("empty or malformed segment"))?);
                chars = &chars[end..];
            }
            if let Some(next) = chars.strip_prefix('/') {
                if next.is_empty() {
                    return Err(bad("trailing /"));
                }
                chars = next;
            } else if !chars.is_empty() {
                return Err(bad("a variable must be a whole segment"));
            }
        }
        Ok(t)
    }

    /// The field paths of its variables.
    pub fn variables(&self) -> impl Iterator<Item = &[String]> {
        self.variables.iter().map(Vec::as_slice)
    }

    /// The variables' values if `path` (a request path, percent-encoded) matches.
    pub fn matches(&self, path: &str) -> Option<Vec<(Vec<String>, String)>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => {
                let (head, v) = rest.rsplit_once(':')?;
                if v != verb {
                    return None;
                }
                head
            }
            None => rest,
        };
        let segments: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let mut starts = vec![0; self.variables.len()];
        let mut values = vec![None; self.variables.len()];
        if !self.walk(0, &segments, 0, &mut starts, &mut values) {
            return None;
        }
        Some(
            self.variables
                .iter()
                .cloned()
                .zip(values)
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect(),
        )
    }

    fn walk(
        &self,
        e: usize,
        segments: &[&str],
        s: usize,
        starts: &mut [usize],
        values: &mut [Option<String>],
    ) -> bool {
        let Some(elem) = self.elems.get(e) else {
            return s == segments.len();
        };
        match elem {
            Elem::Literal(l) => {
                segments.get(s).is_some_and(|seg| percent_decode(seg) == *l)
                    && self.walk(e + 1, segments, s + 1, starts, values)
            }
            Elem::Star => {
                segments.get(s).is_some_and(|seg| !seg.is_empty())
                    && self.walk(e + 1, segments, s + 1, starts, values)
            }
            Elem::DoubleStar => (s..=segments.len())
                .rev()
                .any(|end| self.walk(e + 1, segments, end, starts, values)),
            Elem::Start(i) => {
                starts[*i] = s;
                self.walk(e + 1, segments, s, starts, values)
            }
            Elem::End(i) => {
                let value = segments[starts[*i]..s]
                    .iter()
                    .map(|seg| percent_decode(seg))
                    .collect::<Vec<_>>()
                    .join("/");
                values[*i] = Some(value);
                self.walk(e + 1, segments, s, starts, values)
            }
        }
    }
}

fn segment(s: &str) -> Option<Elem> {
    match s {
        "" => None,
        "*" => Some(Elem::Star),
        "**" => Some(Elem::DoubleStar),
        lit if lit.contains(['{', '}']) => None,
        lit => Some(Elem::Literal(lit.to_string())),
    }
}

/// Decodes `%XX` escapes (invalid ones stay as they are); invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        Template::parse(t)
            .unwrap()
            .matches(path)
            .map(|v| v.into_iter().map(|(k, v)| (k.join("."), v)).collect())
    }

    #[test]
    fn literals_and_single_segment_variables() {
        assert_eq!(
            vars("/tck/model/crdt/{id}", "/tck/model/crdt/PNCounter-1"),
            Some(vec![("id".into(), "PNCounter-1".into())])
        );
        assert_eq!(vars("/tck/model/crdt/{id}", "/tck/model/crdt/a/b"), None);
        assert_eq!(vars("/tck/model/crdt/{id}", "/tck/model/crdt"), None);
        assert_eq!(
            vars("/a/{x}", "/a/%41%2Fb"),
            Some(vec![("x".into(), "A/b".into())])
        );
    }

    #[test]
    fn patterns_nested_fields_and_verbs() {
        assert_eq!(
            vars("/v1/{name=shelves/*/books/*}", "/v1/shelves/s1/books/b2"),
            Some(vec![("name".into(), "shelves/s1/books/b2".into())])
        );
        assert_eq!(vars("/v1/{name=shelves/*/books/*}", "/v1/shelves/s1"), None);
        assert_eq!(
            vars("/v1/{a.b}/x/{c=**}", "/v1/q/x/r/s/t"),
            Some(vec![
                ("a.b".into(), "q".into()),
                ("c".into(), "r/s/t".into())
            ])
        );
        assert_eq!(
            vars("/v1/{id}:run", "/v1/k:run"),
            Some(vec![("id".into(), "k".into())])
        );
        assert_eq!(vars("/v1/{id}:run", "/v1/k:walk"), None);
        assert_eq!(vars("/v1/{id}:run", "/v1/k"), None);
        assert_eq!(vars("/v1/**", "/v1"), Some(vec![]));
    }

    #[test]
    fn bad_templates_are_refused() {
        for t in ["v1/x", "/v1/{x", "/v1//x", "/v1/x/", "/v1/a{x}"] {
            assert!(Template::parse(t).is_err(), "{t}");
        }
    }
}
