//! Per-route choices from Envoy route metadata.
//!
//! Envoy's Wasm filter has no per-route configuration (envoy#26440), but a
//! route's `metadata.filter_metadata["mesh-filters"]` is readable as the
//! property `xds.route_metadata.filter_metadata.mesh-filters.<filter>`:
//!
//! ```yaml
//! metadata:
//!   filter_metadata:
//!     mesh-filters:
//!       ratelimit: { rule: "gold" }      # apply only the rule named "gold" here
//!       metrics: { disabled: true }      # this filter does nothing on this route
//! ```
//!
//! Envoy hands a struct over in proxy-wasm's map encoding: a little-endian
//! u32 count, then (key length, value length) u32 pairs, then each key and
//! value followed by a NUL. Strings are raw bytes; booleans one byte.

/// What a route's metadata says to one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChoice {
    /// No metadata for this filter: the rules apply as configured.
    Default,
    /// `{"disabled": true}`: the filter does nothing on this route.
    Disabled,
    /// `{"rule": "<name>"}`: only this rule applies on this route.
    Rule(Vec<u8>),
}

impl RouteChoice {
    /// What the route says to `filter`; `Default` without a read when the
    /// filter's `route_metadata` option is off (it costs one property read).
    pub fn of(req: &mut dyn crate::Request, filter: &str, enabled: bool) -> RouteChoice {
        if enabled {
            parse(req.route_metadata(filter))
        } else {
            RouteChoice::Default
        }
    }

    /// Whether the rule named `rule` may apply on this route.
    pub fn allows(&self, rule: &str) -> bool {
        match self {
            RouteChoice::Default => true,
            RouteChoice::Disabled => false,
            RouteChoice::Rule(name) => name.as_slice() == rule.as_bytes(),
        }
    }
}

/// The property path of a filter's route metadata.
pub fn property_path(filter: &str) -> [&str; 5] {
    [
        "xds",
        "route_metadata",
        "filter_metadata",
        "mesh-filters",
        filter,
    ]
}

/// Reads the encoded struct; anything unexpected means `Default`.
pub fn parse(bytes: Option<&[u8]>) -> RouteChoice {
    let Some(pairs) = bytes.and_then(decode_pairs) else {
        return RouteChoice::Default;
    };
    let mut choice = RouteChoice::Default;
    for (key, value) in pairs {
        match key {
            b"disabled" if value == [1] => return RouteChoice::Disabled,
            b"rule" if !value.is_empty() => choice = RouteChoice::Rule(value.to_vec()),
            _ => {}
        }
    }
    choice
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(raw)).ok()
}

/// Decodes proxy-wasm's map encoding into (key, value) pairs.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let count = read_u32(bytes, 0)?;
    if count > bytes.len() / 8 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        sizes.push((read_u32(bytes, 4 + 8 * i)?, read_u32(bytes, 8 + 8 * i)?));
    }
    let mut at = 4 + 8 * count;
    let mut pairs = Vec::with_capacity(count);
    for (key_len, value_len) in sizes {
        let key = bytes.get(at..at.checked_add(key_len)?)?;
        at = at.checked_add(key_len + 1)?;
        let value = bytes.get(at..at.checked_add(value_len)?)?;
        at = at.checked_add(value_len + 1)?;
        pairs.push((key, value));
    }
    Some(pairs)
}

/// Encodes pairs the way Envoy does, for tests of the cores.
pub fn tests_encode(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = len(pairs.len()).to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&len(k.len()));
        out.extend_from_slice(&len(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Envoy 1.40 returned for `ratelimit: { rule: "gold", disabled: true }` (probed).
    const PROBED: &[u8] = &[
        2, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 114, 117, 108, 101, 0, 103,
        111, 108, 100, 0, 100, 105, 115, 97, 98, 108, 101, 100, 0, 1, 0,
    ];

    #[test]
    fn reads_what_envoy_sends() {
        assert_eq!(
            decode_pairs(PROBED).unwrap(),
            vec![(&b"rule"[..], &b"gold"[..]), (b"disabled", &[1])]
        );
        assert_eq!(parse(Some(PROBED)), RouteChoice::Disabled);
        assert_eq!(
            parse(Some(&tests_encode(&[("rule", b"gold")]))),
            RouteChoice::Rule(b"gold".to_vec())
        );
        assert_eq!(
            parse(Some(&tests_encode(&[("disabled", &[0])]))),
            RouteChoice::Default
        );
        assert_eq!(parse(None), RouteChoice::Default);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse(Some(&bytes));
        }
    }
}
