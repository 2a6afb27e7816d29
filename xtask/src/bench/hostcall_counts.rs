//! How many host calls of each kind a case makes per request, counted by
//! callgrind rather than read from the filters' code: Envoy's binary is
//! stripped, so its functions have no names, but the pricer's dumps show
//! which Envoy function runs exactly once more per call of a kind (10 calls
//! per request: called 10 more times per request than with none). That
//! function, called in no other kind's dump, is the kind's signature; its
//! calls per request in a case's dump, minus noop's, are the case's calls of
//! that kind. Written to target/bench/hostcall-counts.md.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use super::{Options, HOSTCALLS_PER_REQUEST, HOSTCALL_CASE, NOOP, SIZE_VARIANTS};

/// Calls per callee in a callgrind dump (callees by name or address).
fn calls_by_callee(dump: &str) -> HashMap<String, u64> {
    let mut names: HashMap<String, String> = HashMap::new();
    let mut out: HashMap<String, u64> = HashMap::new();
    let mut callee: Option<String> = None;
    for line in dump.lines() {
        let def = match (line.strip_prefix("cfn="), line.strip_prefix("fn=")) {
            (Some(rest), _) => Some((true, rest)),
            (None, Some(rest)) => Some((false, rest)),
            _ => None,
        };
        if let Some((is_callee, rest)) = def {
            // Name compression: "(id) name" the first time, "(id)" after.
            let name = match rest.strip_prefix('(').and_then(|r| r.split_once(')')) {
                Some((id, name)) if !name.trim().is_empty() => {
                    names.insert(id.to_string(), name.trim().to_string());
                    name.trim().to_string()
                }
                Some((id, _)) => names.get(id).cloned().unwrap_or_else(|| id.to_string()),
                None => rest.to_string(),
            };
            if is_callee {
                callee = Some(name);
            }
        } else if let Some(n) = line.strip_prefix("calls=") {
            let n: Option<u64> = n.split_whitespace().next().and_then(|n| n.parse().ok());
            if let (Some(c), Some(n)) = (&callee, n) {
                *out.entry(c.clone()).or_default() += n;
            }
        }
    }
    out
}

fn read(path: &Path) -> Option<HashMap<String, u64>> {
    fs::read_to_string(path).ok().map(|t| calls_by_callee(&t))
}

/// The kinds counted: (label, pricer kinds whose signatures it shares).
const KINDS: &[(&str, &[&str])] = &[
    (
        "request header, one (present or missing)",
        &["request_header", "request_header_missing"],
    ),
    ("request headers, all in one call", &["request_headers_all"]),
    (
        "property (route name, response.code, code_details, ...)",
        &["route_name", "response_code"],
    ),
    ("shared_get", &["shared_get"]),
    ("shared_set", &["shared_set"]),
    ("set_request_header", &["set_request_header"]),
    ("clear_route_cache", &["clear_route_cache"]),
    ("counter_increment", &["counter_increment"]),
    ("histogram_record (or gauge set)", &["histogram_record"]),
    ("current_time", &["current_time"]),
    ("add_response_header", &["add_response_header"]),
];

/// Counts each counted case's host calls from the dumps in `dir`; the
/// markdown table, or why not.
pub(crate) fn count(dir: &Path, opts: &Options) -> Result<String, String> {
    let pricer = |i: usize| read(&dir.join(format!("{HOSTCALL_CASE}.callgrind.{i}")));
    let none = pricer(1).ok_or("no pricer dump")?;
    let n = (opts.counted_requests * 3 / 10).max(100) as f64;
    let per_call = HOSTCALLS_PER_REQUEST as f64;
    let mut raised: HashMap<&str, HashSet<String>> = HashMap::new();
    for (i, call) in hostcall_cost::CALLS.iter().enumerate() {
        let with = pricer(i + 2).ok_or_else(|| format!("no pricer dump for {call}"))?;
        let fns = with
            .iter()
            .filter(|(f, c)| {
                let more = (**c as f64 - *none.get(*f).unwrap_or(&0) as f64) / n;
                (more - per_call).abs() <= 0.5 && f.starts_with("0x00000000")
            })
            .map(|(f, _)| f.clone())
            .collect();
        raised.insert(call, fns);
    }
    let noop = read(&dir.join(format!("{NOOP}.callgrind.1"))).ok_or("no noop dump")?;
    let cases: Vec<(&str, HashMap<String, u64>)> = opts
        .cases
        .iter()
        .filter(|c| c.as_str() != NOOP && !SIZE_VARIANTS.contains(&c.as_str()))
        .filter_map(|c| Some((c.as_str(), read(&dir.join(format!("{c}.callgrind.1")))?)))
        .collect();
    let per_case = opts.counted_requests as f64;
    let mut s = String::from("| host call | ");
    let names: Vec<&str> = cases.iter().map(|(c, _)| *c).collect();
    let _ = writeln!(s, "{} |", names.join(" | "));
    let _ = writeln!(s, "| --- |{}", " ---: |".repeat(cases.len()));
    for (label, kinds) in KINDS {
        let mut shared: Option<HashSet<String>> = None;
        for k in *kinds {
            let fns = raised.get(k).cloned().unwrap_or_default();
            shared = Some(match shared {
                None => fns,
                Some(s) => s.intersection(&fns).cloned().collect(),
            });
        }
        let others: HashSet<&String> = raised
            .iter()
            .filter(|(k, _)| !kinds.contains(k))
            .flat_map(|(_, f)| f)
            .collect();
        let mut candidates: Vec<String> = shared
            .unwrap_or_default()
            .into_iter()
            .filter(|f| !others.contains(f))
            .collect();
        // The function Envoy calls least by itself (noop's count) is the cleanest signature.
        candidates.sort_by_key(|f| (noop.get(f).copied().unwrap_or(0), f.clone()));
        let Some(signature) = candidates.first() else {
            let _ = writeln!(s, "| {label} |{}", " ? |".repeat(cases.len()));
            continue;
        };
        let base = noop.get(signature).copied().unwrap_or(0) as f64 / per_case;
        let counts: Vec<String> = cases
            .iter()
            .map(|(_, d)| {
                let c = d.get(signature).copied().unwrap_or(0) as f64 / per_case - base;
                format!("{c:.2}")
            })
            .collect();
        let _ = writeln!(s, "| {label} | {} |", counts.join(" | "));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::calls_by_callee;

    #[test]
    fn calls_are_summed_per_callee_across_compressed_names() {
        let dump = "fn=(1) main\ncfn=(2) 0x0000000000001000\ncalls=3 0x10\n5 90\n\
                    fn=(3) other\ncfn=(2)\ncalls=2 0x10\n5 60\ncfn=(4) leaf\ncalls=1 0\n1 1\n";
        let calls = calls_by_callee(dump);
        assert_eq!(calls.get("0x0000000000001000"), Some(&5));
        assert_eq!(calls.get("leaf"), Some(&1));
        assert_eq!(calls.get("main"), None);
    }
}
