//! Label values of one request, bounded and encoded once into a cache key.
//!
//! The request-side labels (route, method, cluster, custom) are read in the
//! request phase and written, sanitised, into one string: the key under which
//! the request's series are cached. The response-side labels (status code and
//! class) are a number ([`StatusKey`]), so the response phase builds no string.

use mesh_shared::request::HeaderNames;
use mesh_shared::{Attribute, Request};

use crate::config::{CustomLabel, Labels, MAX_LABEL_VALUE_LEN};

/// Label values that fold an unknown method.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// Separates values in a key; never part of a sanitised value.
const SEPARATOR: char = ' ';
/// The value of every label of the overflow series.
pub const OVERFLOW: &str = "overflow";
/// The value of a request-side label whose source is missing.
pub const UNKNOWN: &str = "unknown";

/// The response-side part of a series: 0 when neither status label is on (or
/// no status was seen), else the code, or the code rounded down to its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusKey(pub u16);

impl Labels {
    /// Names of the request-side labels, in key order.
    pub fn request_names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        if self.route {
            names.push("route");
        }
        if self.method {
            names.push("method");
        }
        if self.cluster {
            names.push("cluster");
        }
        names.extend(self.custom.iter().map(|c| c.name.as_str()));
        names
    }

    /// Adds the request headers [`Labels::request_key`] reads.
    pub fn request_headers(&self, names: &mut HeaderNames) {
        if self.method {
            names.add_attribute(Attribute::Method);
        }
        for label in &self.custom {
            names.add(&label.header);
        }
    }

    /// The request-side label values of `req`, as a cache key.
    pub fn request_key(&self, req: &mut dyn Request) -> String {
        let mut key = String::with_capacity(64);
        let mut first = true;
        let mut next = |key: &mut String| {
            if !first {
                key.push(SEPARATOR);
            }
            first = false;
        };
        if self.route {
            next(&mut key);
            push_value(&mut key, req.attribute(Attribute::Route));
        }
        if self.method {
            next(&mut key);
            let method = req.attribute(Attribute::Method).unwrap_or_default();
            match METHODS.iter().find(|m| m.as_bytes() == method) {
                Some(m) => key.push_str(m),
                None if method.is_empty() => key.push_str(UNKNOWN),
                None => key.push_str("other"),
            }
        }
        if self.cluster {
            next(&mut key);
            push_value(&mut key, req.attribute(Attribute::Cluster));
        }
        for label in &self.custom {
            next(&mut key);
            push_custom(&mut key, label, req.header(&label.header));
        }
        key
    }

    /// The response-side part of a series for an upstream (or local) status.
    pub fn status_key(&self, status: Option<u32>) -> StatusKey {
        let code = status
            .filter(|s| (100..=599).contains(s))
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(0);
        if self.status_code {
            StatusKey(code)
        } else if self.status_class {
            StatusKey(code / 100 * 100)
        } else {
            StatusKey(0)
        }
    }

    /// `(name, value)` of every label of the series `key` + `status`, for its
    /// stat name; `None` for the overflow series.
    pub fn tags<'a>(
        &'a self,
        key: Option<&'a str>,
        status: Option<StatusKey>,
    ) -> Vec<(&'a str, String)> {
        let names = self.request_names();
        let mut tags: Vec<(&str, String)> = match key {
            Some(key) if !names.is_empty() => names
                .into_iter()
                .zip(key.split(SEPARATOR))
                .map(|(n, v)| (n, v.to_string()))
                .collect(),
            Some(_) => Vec::new(),
            None => names
                .into_iter()
                .map(|n| (n, OVERFLOW.to_string()))
                .collect(),
        };
        if let Some(StatusKey(code)) = status {
            let (code_value, class_value) = match (key, code) {
                (None, _) => (OVERFLOW.to_string(), OVERFLOW.to_string()),
                (Some(_), 0) => ("none".to_string(), "none".to_string()),
                (Some(_), code) => (code.to_string(), format!("{}xx", code / 100)),
            };
            if self.status_code {
                tags.push(("response_code", code_value));
            }
            if self.status_class {
                tags.push(("response_code_class", class_value));
            }
        }
        tags
    }
}

/// Writes a value as the stat name encoding keeps it (see
/// `mesh_shared::stats::tag_value`), cut to [`MAX_LABEL_VALUE_LEN`] bytes.
fn push_value(key: &mut String, value: Option<&[u8]>) {
    match value {
        Some(v) if !v.is_empty() => {
            for b in v.iter().take(MAX_LABEL_VALUE_LEN) {
                let c = char::from(*b);
                key.push(if c.is_ascii_graphic() && c != ';' && c != '=' {
                    c
                } else {
                    '_'
                });
            }
        }
        _ => key.push_str(UNKNOWN),
    }
}

fn push_custom(key: &mut String, label: &CustomLabel, value: Option<&[u8]>) {
    match (&label.allowed, value) {
        (_, None) => key.push_str(UNKNOWN),
        (None, value) => push_value(key, value),
        (Some(allowed), Some(value)) => match allowed.iter().find(|a| a.as_bytes() == value) {
            Some(a) => key.push_str(a),
            None => key.push_str(&label.other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use mesh_shared::request::FakeRequest;

    fn labels(json: &str) -> Labels {
        Config::parse(json.as_bytes()).unwrap().labels
    }

    const TENANT: &str = r#"{"labels": {"status_code": true, "custom": [
        {"name": "tenant", "header": "x-tenant", "allowed": ["gold", "silver"]},
        {"name": "client", "header": "x-client"}]}}"#;

    #[test]
    fn keys_hold_the_bounded_values() {
        let l = labels(TENANT);
        let mut req = FakeRequest::new()
            .with(Attribute::Route, "api")
            .with(Attribute::Method, "GET")
            .with(Attribute::Cluster, "backend")
            .with_header("x-tenant", "gold")
            .with_header("x-client", "a b;c=d");
        assert_eq!(l.request_key(&mut req), "api GET backend gold a_b_c_d");
        let mut req = FakeRequest::new()
            .with(Attribute::Method, "BREW")
            .with_header("x-tenant", "platinum");
        assert_eq!(
            l.request_key(&mut req),
            "unknown other unknown other unknown"
        );
        let long = "x".repeat(500);
        let mut req = FakeRequest::new().with_header("x-client", &long);
        let key = l.request_key(&mut req);
        assert!(key.ends_with(&"x".repeat(MAX_LABEL_VALUE_LEN)) && key.len() < 100);
    }

    #[test]
    fn only_configured_labels_are_read() {
        let l = labels(r#"{"labels": {"route": false, "cluster": false}}"#);
        let mut req = FakeRequest::new().with(Attribute::Method, "PUT");
        assert_eq!(l.request_key(&mut req), "PUT");
        assert_eq!(req.lookups, 1, "no lookups for labels that are off");
    }

    #[test]
    fn tags_name_every_label() {
        let l = labels(TENANT);
        let s = l.status_key(Some(503));
        assert_eq!(s, StatusKey(503));
        let tags = l.tags(Some("api GET backend gold c1"), Some(s));
        let tags: Vec<(&str, &str)> = tags.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(
            tags,
            [
                ("route", "api"),
                ("method", "GET"),
                ("cluster", "backend"),
                ("tenant", "gold"),
                ("client", "c1"),
                ("response_code", "503"),
                ("response_code_class", "5xx")
            ]
        );
        let overflow = l.tags(None, None);
        assert_eq!(overflow.len(), 5);
        assert!(overflow.iter().all(|(_, v)| v == OVERFLOW));
    }

    #[test]
    fn status_keys_follow_the_labels_that_are_on() {
        let class_only = labels("{}");
        assert_eq!(class_only.status_key(Some(201)), StatusKey(200));
        assert_eq!(class_only.status_key(Some(204)), StatusKey(200));
        assert_eq!(class_only.status_key(None), StatusKey(0));
        assert_eq!(class_only.status_key(Some(1000)), StatusKey(0));
        let tags = class_only.tags(Some("r GET c"), Some(StatusKey(200)));
        assert_eq!(tags.last().unwrap(), &("response_code_class", "2xx".into()));
        let none = labels(r#"{"labels": {"status_class": false}}"#);
        assert_eq!(none.status_key(Some(500)), StatusKey(0));
    }
}
