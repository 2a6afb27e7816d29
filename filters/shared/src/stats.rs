//! Stat names that come out of Envoy's `/stats/prometheus` as one metric with
//! labels.
//!
//! Envoy names a Wasm metric `wasmcustom.<name>` and turns parts of a name into
//! Prometheus labels with `stats_config.stats_tags` regexes. We write tags the
//! way Istio does (`<tag>=.=<value>;.;` before the metric name) because Istio
//! generates exactly the regex `(<tag>=\.=(.+?);\.;)` for every `extraStatTags`
//! entry: the same names then get labels under plain Envoy (with the
//! `stats_tags` in `envoy/`) and under Istio.

/// `mesh_ratelimit_requests_total` with tags `rule=api` becomes
/// `rule=.=api;.;mesh_ratelimit_requests_total`.
pub fn stat_name(metric: &str, tags: &[(&str, &str)]) -> String {
    let mut name = String::with_capacity(metric.len() + tags.len() * 24);
    for (tag, value) in tags {
        name.push_str(tag);
        name.push_str("=.=");
        name.push_str(&tag_value(value));
        name.push_str(";.;");
    }
    name.push_str(metric);
    name
}

/// Makes a label value safe inside a stat name: the separators `;` and `=`
/// and anything outside printable ASCII become `_`; empty becomes `unknown`.
pub fn tag_value(value: &str) -> String {
    if value.is_empty() {
        return "unknown".to_string();
    }
    value
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ';' && c != '=' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The `stats_tags` regex that extracts `tag` (for docs and Envoy bootstrap files).
pub fn tag_regex(tag: &str) -> String {
    format!("({tag}=\\.=(.+?);\\.;)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_istios_convention() {
        assert_eq!(
            stat_name(
                "mesh_ratelimit_requests_total",
                &[("rule", "api"), ("decision", "allowed")]
            ),
            "rule=.=api;.;decision=.=allowed;.;mesh_ratelimit_requests_total"
        );
        assert_eq!(tag_value("a;b=c d"), "a_b_c_d");
        assert_eq!(tag_value(""), "unknown");
        assert_eq!(tag_regex("rule"), "(rule=\\.=(.+?);\\.;)");
    }
}
