//! The `match` block every rule has: all given conditions must hold; an empty
//! block matches every request. Conditions are checked cheapest-first so a
//! request that fails early costs few host calls.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::request::{Attribute, HeaderNames, Request};
use crate::spec::{checked_string, Checked, HeaderName, NonEmptyList, OneOrMany, Pairs};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    routes: Vec<String>,
    path_prefix: Option<String>,
    path_exact: Option<String>,
    host: Option<HostMatch>,
    methods: Vec<String>,
    headers: Vec<(String, HeaderMatch)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Exact(String),
    /// `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HeaderMatch {
    Exact(Vec<u8>),
    Present(bool),
}

/// A rule's `match` as written; every given condition must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Envoy route name(s) (`xds.route_name`; in Istio the VirtualService http route name).
    pub route: Option<OneOrMany>,
    /// The path (without the query) starts with this.
    pub path_prefix: Option<PathSpec>,
    /// The path (without the query) is exactly this.
    pub path_exact: Option<PathSpec>,
    /// The host, exact or `*.suffix`.
    pub host: Option<HostSpec>,
    /// HTTP methods (any case).
    pub methods: Option<NonEmptyList<MethodSpec>>,
    /// Header name -> exact value, or `{"present": true|false}`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<std::collections::BTreeMap<HeaderName, HeaderMatchSpec>>")
    )]
    pub headers: Option<Pairs<HeaderName, HeaderMatchSpec>>,
}

/// A path: starts with '/'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSpec(pub String);

impl Checked for PathSpec {
    const EXPECTING: &'static str = "a path starting with '/'";
    fn check(text: &str) -> Result<Self, String> {
        if text.starts_with('/') {
            Ok(PathSpec(text.to_string()))
        } else {
            Err(format!("a path must start with '/', got \"{text}\""))
        }
    }
}
checked_string!(PathSpec);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec(HostMatch);

impl Checked for HostSpec {
    const EXPECTING: &'static str = "a host name or \"*.suffix\"";
    fn check(text: &str) -> Result<Self, String> {
        let h = text.to_ascii_lowercase();
        Ok(HostSpec(match h.strip_prefix("*.") {
            _ if h.is_empty() => return Err("must not be empty".into()),
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                HostMatch::Suffix(format!(".{suffix}"))
            }
            _ if h.contains('*') => {
                return Err("a wildcard is allowed only as a leading \"*.\"".into())
            }
            _ => HostMatch::Exact(h),
        }))
    }
}
checked_string!(HostSpec);

/// An HTTP method, upper-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSpec(pub String);

impl Checked for MethodSpec {
    const EXPECTING: &'static str = "an HTTP method";
    fn check(text: &str) -> Result<Self, String> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphabetic()) {
            Ok(MethodSpec(text.to_ascii_uppercase()))
        } else {
            Err(format!("\"{text}\" is not an HTTP method"))
        }
    }
}
checked_string!(MethodSpec);

/// A header condition: an exact value, or `{"present": true|false}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatchSpec(HeaderMatch);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresentSpec {
    present: bool,
}

impl<'de> Deserialize<'de> for HeaderMatchSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderMatchSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (exact value) or {\"present\": true|false}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HeaderMatchSpec, E> {
                Ok(HeaderMatchSpec(HeaderMatch::Exact(v.as_bytes().to_vec())))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<HeaderMatchSpec, A::Error> {
                let p = PresentSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(HeaderMatchSpec(HeaderMatch::Present(p.present)))
            }
        }
        d.deserialize_any(V)
    }
}

impl Matcher {
    /// Compiles a `match` block; `None` (field absent) matches everything.
    pub fn compile(spec: Option<MatchSpec>) -> Matcher {
        let Some(spec) = spec else {
            return Matcher::default();
        };
        Matcher {
            routes: spec.route.map(|r| r.0).unwrap_or_default(),
            path_prefix: spec.path_prefix.map(|p| p.0),
            path_exact: spec.path_exact.map(|p| p.0),
            host: spec.host.map(|h| h.0),
            methods: spec
                .methods
                .map(|m| m.0.into_iter().map(|m| m.0).collect())
                .unwrap_or_default(),
            headers: spec
                .headers
                .unwrap_or_default()
                .into_iter()
                .map(|(name, m)| (name.0, m.0))
                .collect(),
        }
    }

    /// Adds the request headers [`Matcher::matches`] may read.
    pub fn add_headers(&self, names: &mut HeaderNames) {
        if self.path_prefix.is_some() || self.path_exact.is_some() {
            names.add_attribute(Attribute::Path);
        }
        if !self.methods.is_empty() {
            names.add_attribute(Attribute::Method);
        }
        if self.host.is_some() {
            names.add_attribute(Attribute::Host);
        }
        for (name, _) in &self.headers {
            names.add(name);
        }
    }

    /// Whether `req` satisfies every condition.
    pub fn matches(&self, req: &mut dyn Request) -> bool {
        if !self.routes.is_empty() {
            let Some(route) = req.attribute(Attribute::Route) else {
                return false;
            };
            if !self.routes.iter().any(|r| r.as_bytes() == route) {
                return false;
            }
        }
        if self.path_prefix.is_some() || self.path_exact.is_some() {
            let Some(path) = req.attribute(Attribute::Path) else {
                return false;
            };
            if let Some(prefix) = &self.path_prefix {
                if !path.starts_with(prefix.as_bytes()) {
                    return false;
                }
            }
            if let Some(exact) = &self.path_exact {
                if path != exact.as_bytes() {
                    return false;
                }
            }
        }
        if !self.methods.is_empty() {
            let Some(method) = req.attribute(Attribute::Method) else {
                return false;
            };
            if !self.methods.iter().any(|m| m.as_bytes() == method) {
                return false;
            }
        }
        if let Some(host_match) = &self.host {
            let Some(host) = req.attribute(Attribute::Host) else {
                return false;
            };
            let ok = match host_match {
                HostMatch::Exact(h) => host.eq_ignore_ascii_case(h.as_bytes()),
                HostMatch::Suffix(s) => {
                    host.len() > s.len()
                        && host
                            .get(host.len() - s.len()..)
                            .is_some_and(|tail| tail.eq_ignore_ascii_case(s.as_bytes()))
                }
            };
            if !ok {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, want)| match (want, req.header(name)) {
                (HeaderMatch::Exact(v), Some(got)) => got == v.as_slice(),
                (HeaderMatch::Exact(_), None) => false,
                (HeaderMatch::Present(p), got) => got.is_some() == *p,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;
    use crate::request::FakeRequest;

    fn matcher(text: &str) -> Result<Matcher, ConfigError> {
        crate::spec::parse_fragment::<MatchSpec>(text.as_bytes()).map(|m| Matcher::compile(Some(m)))
    }

    #[test]
    fn empty_match_matches_everything_without_lookups() {
        let m = matcher("{}").unwrap();
        let mut req = FakeRequest::new();
        assert!(m.matches(&mut req));
        assert_eq!(req.lookups, 0);
    }

    #[test]
    fn every_condition_must_hold() {
        let m = matcher(
            r#"{"route": ["api", "web"], "path_prefix": "/v1", "methods": ["get"],
                "host": "*.example.com", "headers": {"x-tenant": "gold", "x-debug": {"present": false}}}"#,
        )
        .unwrap();
        let good = FakeRequest::new()
            .with(Attribute::Route, "web")
            .with(Attribute::Path, "/v1/items")
            .with(Attribute::Method, "GET")
            .with(Attribute::Host, "shop.EXAMPLE.com")
            .with_header("x-tenant", "gold");
        assert!(m.matches(&mut good.clone()));
        assert!(!m.matches(&mut good.clone().with_header("x-debug", "1")));
        let mut wrong_route = good.clone();
        wrong_route.attributes[0].1 = b"admin".to_vec();
        assert!(!m.matches(&mut wrong_route));
        let mut bare_host = good.clone();
        bare_host.attributes[3].1 = b"example.com".to_vec();
        assert!(!m.matches(&mut bare_host));
        let mut wrong_tenant = good.clone();
        wrong_tenant.headers[0].1 = b"silver".to_vec();
        assert!(!m.matches(&mut wrong_tenant));
    }

    #[test]
    fn a_failed_route_check_stops_further_lookups() {
        let m = matcher(r#"{"route": "api", "headers": {"x-a": "1"}}"#).unwrap();
        let mut req = FakeRequest::new().with(Attribute::Route, "other");
        assert!(!m.matches(&mut req));
        assert_eq!(req.lookups, 1);
    }

    #[test]
    fn bad_matches_name_the_field() {
        assert_eq!(
            matcher(r#"{"path_prefix": "v1"}"#).unwrap_err().path,
            "path_prefix"
        );
        assert_eq!(
            matcher(r#"{"methods": ["G ET"]}"#).unwrap_err().path,
            "methods[0]"
        );
        assert_eq!(
            matcher(r#"{"headers": {"x": 3}}"#).unwrap_err().path,
            "headers.x"
        );
        assert_eq!(
            matcher(r#"{"headers": {"x": {"presnt": true}}}"#)
                .unwrap_err()
                .path,
            "headers.x.presnt"
        );
        assert_eq!(
            matcher(r#"{"methods": []}"#).unwrap_err().to_string(),
            "methods: must not be an empty list"
        );
        assert_eq!(matcher(r#"{"route": []}"#).unwrap_err().path, "route");
        assert_eq!(matcher(r#"{"host": "a.*.com"}"#).unwrap_err().path, "host");
        assert_eq!(matcher(r#"{"rout": "a"}"#).unwrap_err().path, "rout");
    }
}
