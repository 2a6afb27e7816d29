//! The `match` block every rule has: all given conditions must hold; an empty
//! block matches every request. Conditions are checked cheapest-first so a
//! request that fails early costs few host calls.

use crate::config::{ConfigError, Node};
use crate::json::Value;
use crate::request::{Attribute, Request};

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

impl Matcher {
    /// Parses a `match` object; `None` (field absent) matches everything.
    pub fn parse(node: Option<&Node<'_>>) -> Result<Matcher, ConfigError> {
        let Some(node) = node else {
            return Ok(Matcher::default());
        };
        let mut f = node.object()?;
        let mut m = Matcher::default();
        if let Some(n) = f.optional("route") {
            m.routes = n.one_or_many_str()?;
        }
        if let Some(n) = f.optional("path_prefix") {
            m.path_prefix = Some(path(&n)?);
        }
        if let Some(n) = f.optional("path_exact") {
            m.path_exact = Some(path(&n)?);
        }
        if let Some(n) = f.optional("host") {
            let h = n.name()?.to_ascii_lowercase();
            m.host = Some(match h.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() => HostMatch::Suffix(format!(".{suffix}")),
                _ if h.contains('*') => {
                    return Err(n.error("a wildcard is allowed only as a leading \"*.\""))
                }
                _ => HostMatch::Exact(h),
            });
        }
        if let Some(n) = f.optional("methods") {
            for item in n.list()? {
                let method = item.name()?;
                if !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(item.error(format!("\"{method}\" is not an HTTP method")));
                }
                m.methods.push(method.to_ascii_uppercase());
            }
            if m.methods.is_empty() {
                return Err(n.error("must not be an empty list"));
            }
        }
        if let Some(n) = f.optional("headers") {
            for (name, value_node) in n.object()?.entries() {
                let header = match value_node.value() {
                    Value::String(s) => HeaderMatch::Exact(s.as_bytes().to_vec()),
                    Value::Object(_) => {
                        let mut o = value_node.object()?;
                        let present = o.optional("present");
                        o.finish()?;
                        let present = present.ok_or_else(|| {
                            value_node.error("expected {\"present\": true|false}")
                        })?;
                        HeaderMatch::Present(present.bool()?)
                    }
                    _ => {
                        return Err(value_node
                            .error("expected a string (exact value) or {\"present\": true|false}"))
                    }
                };
                m.headers.push((header_name_of(&value_node, name)?, header));
            }
        }
        f.finish()?;
        Ok(m)
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

fn path(node: &Node<'_>) -> Result<String, ConfigError> {
    let p = node.name()?;
    if !p.starts_with('/') {
        return Err(node.error(format!("a path must start with '/', got \"{p}\"")));
    }
    Ok(p.to_string())
}

fn header_name_of(node: &Node<'_>, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b) || (i == 0 && b == b':')
        });
    if !ok {
        return Err(node.error(format!("\"{name}\" is not a valid header name")));
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_document;
    use crate::request::FakeRequest;

    fn matcher(text: &str) -> Result<Matcher, ConfigError> {
        let v = parse_document(text.as_bytes()).unwrap();
        Matcher::parse(Some(&Node::root(&v)))
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
        assert_eq!(matcher(r#"{"host": "a.*.com"}"#).unwrap_err().path, "host");
        assert_eq!(matcher(r#"{"rout": "a"}"#).unwrap_err().path, "rout");
    }
}
