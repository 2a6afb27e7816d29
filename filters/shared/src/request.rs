//! The request as the policy cores see it: headers and a few Envoy attributes,
//! fetched lazily so a request pays only for what a matching rule reads.

use serde::Deserialize;

use crate::spec::{HeaderName, NonEmpty};

/// Request attributes that come from Envoy rather than from a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute {
    /// `:path` without the query string.
    Path,
    /// `:method`.
    Method,
    /// `:authority` without the port, lower-cased.
    Host,
    /// Envoy route name (`xds.route_name`; in Istio, the VirtualService http route name).
    Route,
    /// Upstream cluster chosen by the route (`xds.cluster_name`).
    Cluster,
    /// Client IP address, without the port (`source.address`).
    ClientIp,
}

impl Attribute {
    pub const ALL: [Attribute; 6] = [
        Attribute::Path,
        Attribute::Method,
        Attribute::Host,
        Attribute::Route,
        Attribute::Cluster,
        Attribute::ClientIp,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The configuration name (`"client_ip"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Path => "path",
            Attribute::Method => "method",
            Attribute::Host => "host",
            Attribute::Route => "route",
            Attribute::Cluster => "cluster",
            Attribute::ClientIp => "client_ip",
        }
    }

    /// The request header the attribute is read from, if it is one.
    pub fn header_name(self) -> Option<&'static str> {
        match self {
            Attribute::Path => Some(":path"),
            Attribute::Method => Some(":method"),
            Attribute::Host => Some(":authority"),
            Attribute::Route | Attribute::Cluster | Attribute::ClientIp => None,
        }
    }

    pub fn from_name(name: &str) -> Option<Attribute> {
        Some(match name {
            "path" => Attribute::Path,
            "method" => Attribute::Method,
            "host" => Attribute::Host,
            "route" => Attribute::Route,
            "cluster" => Attribute::Cluster,
            "client_ip" => Attribute::ClientIp,
            _ => return None,
        })
    }
}

/// What a core may ask of the request. Header names are lower-case. Values are
/// bytes: header values need not be UTF-8, and the cores must not care.
pub trait Request {
    fn header(&mut self, name: &str) -> Option<&[u8]>;
    fn attribute(&mut self, attr: Attribute) -> Option<&[u8]>;
    /// The route's `mesh-filters` metadata for `filter` (see `route_metadata`).
    fn route_metadata(&mut self, _filter: &str) -> Option<&[u8]> {
        None
    }
}

/// Where a value (a rate-limit key part, a sticky key, a breaker scope) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Header(String),
    Cookie(String),
    Attribute(Attribute),
    Static(String),
}

/// A [`Source`] as written: `"client_ip"` / `"path"` / ... or `{"header": "x"}`,
/// `{"cookie": "c"}`, `{"static": "v"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SourceSpec {
    /// The client's IP address (`source.address` without the port).
    ClientIp,
    /// The path without the query string.
    Path,
    Method,
    /// The authority without the port, lower-cased.
    Host,
    /// The Envoy route name.
    Route,
    /// The upstream cluster.
    Cluster,
    /// A request header.
    Header(HeaderName),
    /// A cookie of the `cookie` header.
    Cookie(NonEmpty),
    /// A fixed value.
    Static(String),
}

impl From<SourceSpec> for Source {
    fn from(spec: SourceSpec) -> Source {
        match spec {
            SourceSpec::ClientIp => Source::Attribute(Attribute::ClientIp),
            SourceSpec::Path => Source::Attribute(Attribute::Path),
            SourceSpec::Method => Source::Attribute(Attribute::Method),
            SourceSpec::Host => Source::Attribute(Attribute::Host),
            SourceSpec::Route => Source::Attribute(Attribute::Route),
            SourceSpec::Cluster => Source::Attribute(Attribute::Cluster),
            SourceSpec::Header(h) => Source::Header(h.0),
            SourceSpec::Cookie(c) => Source::Cookie(c.0),
            SourceSpec::Static(v) => Source::Static(v),
        }
    }
}

impl Source {
    /// The value for this request, if the request has one.
    pub fn read<'r>(&'r self, req: &'r mut dyn Request) -> Option<&'r [u8]> {
        match self {
            Source::Header(name) => req.header(name),
            Source::Cookie(name) => req.header("cookie").and_then(|c| cookie_value(c, name)),
            Source::Attribute(attr) => req.attribute(*attr),
            Source::Static(value) => Some(value.as_bytes()),
        }
    }
}

/// The distinct request headers a configuration may read per request,
/// collected at configure time (the header plan, `part::HeaderPlan`).
#[derive(Debug, Default)]
pub struct HeaderNames(Vec<String>);

impl HeaderNames {
    pub fn add(&mut self, name: &str) {
        if !self.0.iter().any(|n| n == name) {
            self.0.push(name.to_string());
        }
    }

    pub fn add_attribute(&mut self, attr: Attribute) {
        if let Some(name) = attr.header_name() {
            self.add(name);
        }
    }

    pub fn add_source(&mut self, source: &Source) {
        match source {
            Source::Header(name) => self.add(name),
            Source::Cookie(_) => self.add("cookie"),
            Source::Attribute(attr) => self.add_attribute(*attr),
            Source::Static(_) => {}
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether one call for the whole header map costs Envoy less than a
    /// call for each of these headers, at the prices measured in Envoy
    /// instructions (BENCHMARKS.md, "Host calls cut": `request_header`
    /// 11 150 per present header, `request_headers_all` 12 900 for a request
    /// like the bench's). Every header counts as present, as a configured
    /// header usually is (a missing one costs about 2 500 alone): from two
    /// headers on, one call for all is cheaper.
    pub fn cheaper_in_one_call(&self) -> bool {
        const PRESENT: usize = 11_150;
        const ALL: usize = 12_900;
        self.len().saturating_mul(PRESENT) > ALL
    }
}

/// The value of cookie `name` in a `cookie` header (`a=1; b=2`).
pub fn cookie_value<'c>(header: &'c [u8], name: &str) -> Option<&'c [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (k, v) = pair.split_at(eq);
        (k == name.as_bytes()).then(|| trim(v.get(1..).unwrap_or_default()))
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Strips the query string from a `:path` value.
pub fn path_without_query(path: &[u8]) -> &[u8] {
    match path.iter().position(|b| *b == b'?' || *b == b'#') {
        Some(i) => path.get(..i).unwrap_or(path),
        None => path,
    }
}

/// Strips the port from an `:authority` value (`host:80`, `[::1]:80`).
pub fn host_without_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return match authority.iter().position(|b| *b == b']') {
            Some(end) => authority.get(..=end).unwrap_or(authority),
            None => authority,
        };
    }
    match authority.iter().rposition(|b| *b == b':') {
        Some(i) => authority.get(..i).unwrap_or(authority),
        None => authority,
    }
}

/// Strips the port from Envoy's `source.address` (`1.2.3.4:5678`, `[::1]:5678`).
pub fn ip_without_port(address: &[u8]) -> &[u8] {
    if address.first() == Some(&b'[') {
        return match address.iter().position(|b| *b == b']') {
            Some(end) => address.get(1..end).unwrap_or(address),
            None => address,
        };
    }
    // A bare IPv6 address has several ':'; only "ip:port" has exactly one.
    if address.iter().filter(|b| **b == b':').count() == 1 {
        host_without_port(address)
    } else {
        address
    }
}

/// The first value of header `name` in a header map serialized as
/// `proxy_get_header_map_pairs` returns it: the pair count (u32 LE), each
/// pair's name and value sizes (u32 LE each), then each name and value
/// followed by a NUL. The first, as a single-header read returns the first
/// of repeated headers. A malformed map has no headers.
pub fn pair_value<'m>(map: &'m [u8], name: &str) -> Option<&'m [u8]> {
    let word = |at: usize| -> Option<usize> {
        let bytes: [u8; 4] = map.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(bytes)).ok()
    };
    let count = word(0)?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    for pair in 0..count {
        let sizes = 4 + pair * 8;
        let (name_len, value_len) = (word(sizes)?, word(sizes + 4)?);
        let key = map.get(data..data.checked_add(name_len)?)?;
        let value_at = data.checked_add(name_len)?.checked_add(1)?;
        let value = map.get(value_at..value_at.checked_add(value_len)?)?;
        if key == name.as_bytes() {
            return Some(value);
        }
        data = value_at.checked_add(value_len)?.checked_add(1)?;
    }
    None
}

/// A request made of maps, for tests of the cores.
#[derive(Debug, Default, Clone)]
pub struct FakeRequest {
    pub headers: Vec<(String, Vec<u8>)>,
    pub attributes: Vec<(Attribute, Vec<u8>)>,
    /// Encoded route metadata per filter.
    pub route_metadata: Vec<(String, Vec<u8>)>,
    /// How many lookups the core made, to check it fetches only what it needs.
    pub lookups: usize,
}

impl FakeRequest {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    pub fn with(mut self, attr: Attribute, value: impl AsRef<[u8]>) -> Self {
        self.attributes.push((attr, value.as_ref().to_vec()));
        self
    }
}

impl Request for FakeRequest {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.lookups += 1;
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn attribute(&mut self, attr: Attribute) -> Option<&[u8]> {
        self.lookups += 1;
        self.attributes
            .iter()
            .find(|(a, _)| *a == attr)
            .map(|(_, v)| v.as_slice())
    }

    fn route_metadata(&mut self, filter: &str) -> Option<&[u8]> {
        self.lookups += 1;
        self.route_metadata
            .iter()
            .find(|(f, _)| f == filter)
            .map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    fn source(text: &str) -> Result<Source, ConfigError> {
        crate::spec::parse_fragment::<SourceSpec>(text.as_bytes()).map(Source::from)
    }

    #[test]
    fn sources_parse_in_both_forms() {
        assert_eq!(
            source(r#""client_ip""#).unwrap(),
            Source::Attribute(Attribute::ClientIp)
        );
        assert_eq!(
            source(r#"{"header": "X-Api-Key"}"#).unwrap(),
            Source::Header("x-api-key".into())
        );
        assert_eq!(
            source(r#"{"static": "all"}"#).unwrap(),
            Source::Static("all".into())
        );
        assert!(source(r#""clientip""#)
            .unwrap_err()
            .message
            .starts_with("unknown variant `clientip`, expected one of `client_ip`"));
        assert!(source(r#"{"header": "a", "static": "b"}"#).is_err());
        assert!(source(r#"{"header": "bad name"}"#).is_err());
        assert!(source(r#"{"haeder": "a"}"#).is_err());
    }

    /// Serializes pairs as the host does.
    fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = u32::try_from(pairs.len()).unwrap().to_le_bytes().to_vec();
        for (n, v) in pairs {
            out.extend(u32::try_from(n.len()).unwrap().to_le_bytes());
            out.extend(u32::try_from(v.len()).unwrap().to_le_bytes());
        }
        for (n, v) in pairs {
            out.extend(n.as_bytes());
            out.push(0);
            out.extend(*v);
            out.push(0);
        }
        out
    }

    #[test]
    fn header_values_are_found_in_the_serialized_map() {
        let map = serialize(&[
            (":method", b"GET"),
            ("x-empty", b""),
            ("x-tenant", b"gold"),
            ("x-tenant", b"silver"),
            ("x-bytes", b"\xff\x00\xfe"),
        ]);
        assert_eq!(pair_value(&map, ":method"), Some(&b"GET"[..]));
        assert_eq!(pair_value(&map, "x-empty"), Some(&b""[..]));
        assert_eq!(pair_value(&map, "x-tenant"), Some(&b"gold"[..]));
        assert_eq!(pair_value(&map, "x-bytes"), Some(&b"\xff\x00\xfe"[..]));
        assert_eq!(pair_value(&map, "x-absent"), None);
        assert_eq!(pair_value(&serialize(&[]), ":method"), None);
    }

    #[test]
    fn a_malformed_header_map_has_no_headers_and_does_not_panic() {
        let map = serialize(&[(":method", b"GET"), ("x-tenant", b"gold")]);
        for cut in 0..map.len() {
            let found = pair_value(map.get(..cut).unwrap(), "x-tenant");
            assert!(found.is_none() || found == Some(&b"gold"[..]));
        }
        let mut huge = map.clone();
        huge.splice(0..4, u32::MAX.to_le_bytes());
        assert_eq!(pair_value(&huge, "x-tenant"), None);
        let mut long_name = map;
        long_name.splice(4..8, u32::MAX.to_le_bytes());
        assert_eq!(pair_value(&long_name, ":method"), None);
        assert_eq!(pair_value(b"", ":method"), None);
    }

    #[test]
    fn cookies_and_addresses() {
        assert_eq!(
            cookie_value(b"a=1; user=bob ;c=3", "user"),
            Some(&b"bob"[..])
        );
        assert_eq!(cookie_value(b"a=1", "user"), None);
        assert_eq!(ip_without_port(b"10.0.0.1:5555"), b"10.0.0.1");
        assert_eq!(ip_without_port(b"[::1]:5555"), b"::1");
        assert_eq!(ip_without_port(b"::1"), b"::1");
        assert_eq!(host_without_port(b"example.com:8080"), b"example.com");
        assert_eq!(host_without_port(b"[::1]:80"), b"[::1]");
        assert_eq!(path_without_query(b"/a/b?x=1"), b"/a/b");
    }
}
