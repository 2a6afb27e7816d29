//! mesh-filters metrics: RED metrics (requests, errors, duration, sizes,
//! in-flight) with bounded label values.
//!
//! The core is plain Rust: [`labels`] turns a request into a bounded cache key,
//! [`Registry`] maps keys to metric ids, defining each series once and folding
//! label sets past `max_series` into one overflow series. The series budget is
//! shared by all workers through [`mesh_shared::SharedStore`]. `filter.rs` is
//! the thin proxy-wasm adapter (wasm32 only).

pub mod config;
pub mod labels;
pub mod spec;

#[cfg(target_arch = "wasm32")]
pub mod part;
// The module's entry points; off when the suite links this crate for its part.
#[cfg(all(target_arch = "wasm32", feature = "module"))]
mod filter;

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use mesh_shared::hash::{hash64, KeyHasher};
use mesh_shared::store::{ensure, update, Step};
use mesh_shared::SharedStore;

pub use config::{Config, CustomLabel, Labels};
pub use labels::StatusKey;

/// CAS attempts on the shared series count before giving up (the series is
/// then folded, which is always safe).
const MAX_CAS_ATTEMPTS: u32 = 64;

/// Metric names under the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub requests_total: String,
    pub request_duration_ms: String,
    pub request_bytes: String,
    pub response_bytes: String,
    pub requests_in_flight: String,
    pub series_overflow_total: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            requests_total: format!("{prefix}_requests_total"),
            request_duration_ms: format!("{prefix}_request_duration_ms"),
            request_bytes: format!("{prefix}_request_bytes"),
            response_bytes: format!("{prefix}_response_bytes"),
            requests_in_flight: format!("{prefix}_requests_in_flight"),
            series_overflow_total: format!("{prefix}_series_overflow_total"),
        }
    }
}

/// Defines metrics in the host; the adapter implements it over proxy-wasm.
pub trait Define {
    /// Ids of `<prefix>_requests_in_flight` for one request-side label set.
    type Gauge: Copy;
    /// Ids of the request counter and the three histograms for one label set.
    type Series: Copy;
    fn gauge(&mut self, tags: &[(&str, String)]) -> Self::Gauge;
    fn series(&mut self, tags: &[(&str, String)]) -> Self::Series;
}

/// The number of label sets all workers may define, counted in shared data.
///
/// Admitting a label set reserves one unit of the count with CAS, then marks
/// the set as admitted. Two workers admitting the same new set at once both
/// reserve a unit: the count can run ahead of the sets (fewer series than
/// `max_series` in that rare case), never behind, so the bound always holds.
#[derive(Debug, Clone)]
pub struct Budget {
    count_key: String,
    set_prefix: String,
    max: u64,
}

impl Budget {
    /// `scope` names the filter instance (plugin name); the label layout is part
    /// of the key so a changed configuration starts a fresh budget (its series
    /// have other names).
    pub fn new(scope: &str, config: &Config) -> Budget {
        // The label names (letters, digits, '_') quoted as `{:?}` of the list
        // would, without bringing str's escaping and its Unicode tables in.
        let names: Vec<String> = config
            .labels
            .request_names()
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect();
        let layout = format!(
            "{}|[{}]|{}|{}",
            config.prefix,
            names.join(", "),
            config.labels.status_code,
            config.labels.status_class
        );
        let base = format!(
            "mesh.metrics.{scope}.{:016x}.",
            hash64(&[layout.as_bytes()])
        );
        Budget {
            count_key: format!("{base}count"),
            set_prefix: base,
            max: config.max_series,
        }
    }

    /// Creates the shared count. Call at configure time: the first write of a
    /// missing key is unconditional, so two workers creating it at once under
    /// traffic could lose a reservation.
    pub fn create(&self, store: &dyn SharedStore) {
        ensure(store, &self.count_key, &0u64.to_le_bytes());
    }

    /// Whether the label set `key` (already namespaced) has, or now gets, a series.
    fn admit(&self, store: &dyn SharedStore, key: &str) -> bool {
        let set_key = format!("{}{key}", self.set_prefix);
        if store.get(&set_key).is_some() {
            return true;
        }
        let reserved = update(store, &self.count_key, MAX_CAS_ATTEMPTS, |current| {
            let count = current
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            if count >= self.max {
                Step::Keep(false)
            } else {
                Step::Write((count + 1).to_le_bytes().to_vec(), true)
            }
        });
        match reserved {
            Ok((true, _)) => store.set(&set_key, b"1", None).is_ok(),
            _ => false,
        }
    }

    /// Label sets admitted so far (all workers).
    pub fn count(&self, store: &dyn SharedStore) -> u64 {
        store
            .get(&self.count_key)
            .and_then(|(b, _)| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    }
}

/// A series looked up for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<T> {
    pub ids: T,
    /// The label set was folded into the overflow series.
    pub folded: bool,
}

struct Entry<G, S> {
    gauge: G,
    by_status: Vec<(StatusKey, S)>,
}

/// This worker's cache of defined series. Holds only admitted label sets, so
/// it never holds more than `max_series` of them, whatever clients send.
pub struct Registry<D: Define> {
    labels: Labels,
    budget: Budget,
    entries: HashMap<String, Entry<D::Gauge, D::Series>, BuildHasherDefault<KeyHasher>>,
    overflow_gauge: Option<D::Gauge>,
    overflow_series: Option<D::Series>,
}

impl<D: Define> Registry<D> {
    pub fn new(labels: Labels, budget: Budget) -> Self {
        Registry {
            labels,
            budget,
            entries: HashMap::default(),
            overflow_gauge: None,
            overflow_series: None,
        }
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The in-flight gauge for the request-side label set `key`. A request
    /// set needs its own budget unit before any of its status series can get one.
    pub fn gauge(&mut self, key: &str, store: &dyn SharedStore, define: &mut D) -> Found<D::Gauge> {
        if let Some(e) = self.entries.get(key) {
            return Found {
                ids: e.gauge,
                folded: false,
            };
        }
        if self.budget.admit(store, &format!("r {key}")) {
            let gauge = define.gauge(&self.labels.tags(Some(key), None));
            self.entries.insert(
                key.to_string(),
                Entry {
                    gauge,
                    by_status: Vec::new(),
                },
            );
            return Found {
                ids: gauge,
                folded: false,
            };
        }
        let labels = &self.labels;
        let ids = *self
            .overflow_gauge
            .get_or_insert_with(|| define.gauge(&labels.tags(None, None)));
        Found { ids, folded: true }
    }

    /// The request counter and histograms for `key` with `status`.
    pub fn series(
        &mut self,
        key: &str,
        status: StatusKey,
        store: &dyn SharedStore,
        define: &mut D,
    ) -> Found<D::Series> {
        if !self.entries.contains_key(key) {
            // Response without our request phase (an earlier filter answered).
            let _ = self.gauge(key, store, define);
        }
        if let Some(entry) = self.entries.get_mut(key) {
            if let Some((_, ids)) = entry.by_status.iter().find(|(s, _)| *s == status) {
                return Found {
                    ids: *ids,
                    folded: false,
                };
            }
            if self.budget.admit(store, &format!("s {} {key}", status.0)) {
                let ids = define.series(&self.labels.tags(Some(key), Some(status)));
                entry.by_status.push((status, ids));
                return Found { ids, folded: false };
            }
        }
        let labels = &self.labels;
        let ids = *self
            .overflow_series
            .get_or_insert_with(|| define.series(&labels.tags(None, Some(StatusKey(0)))));
        Found { ids, folded: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_shared::stats::stat_name;
    use mesh_shared::store::MemoryStore;
    use proptest::prelude::*;

    /// Records the stat names defined; ids are indexes into that list.
    #[derive(Default)]
    struct FakeHost {
        defined: Vec<String>,
    }

    impl Define for FakeHost {
        type Gauge = usize;
        type Series = usize;
        fn gauge(&mut self, tags: &[(&str, String)]) -> usize {
            let tags: Vec<(&str, &str)> = tags.iter().map(|(n, v)| (*n, v.as_str())).collect();
            self.defined
                .push(stat_name("mesh_requests_in_flight", &tags));
            self.defined.len() - 1
        }
        fn series(&mut self, tags: &[(&str, String)]) -> usize {
            let tags: Vec<(&str, &str)> = tags.iter().map(|(n, v)| (*n, v.as_str())).collect();
            self.defined.push(stat_name("mesh_requests_total", &tags));
            self.defined.len() - 1
        }
    }

    fn registry_in(store: &MemoryStore, json: &str, scope: &str) -> Registry<FakeHost> {
        let config = Config::parse(json.as_bytes()).unwrap();
        let budget = Budget::new(scope, &config);
        budget.create(store);
        Registry::new(config.labels, budget)
    }

    #[test]
    fn series_are_defined_once_per_label_set() {
        let store = MemoryStore::new();
        let mut host = FakeHost::default();
        let mut r = registry_in(&store, r#"{"labels": {"status_code": true}}"#, "t");
        for _ in 0..3 {
            let g = r.gauge("api GET backend", &store, &mut host);
            assert!(!g.folded);
            let ok = r.series("api GET backend", StatusKey(200), &store, &mut host);
            let err = r.series("api GET backend", StatusKey(503), &store, &mut host);
            assert_ne!(ok.ids, err.ids);
        }
        assert_eq!(
            host.defined,
            [
                "route=.=api;.;method=.=GET;.;cluster=.=backend;.;mesh_requests_in_flight",
                "route=.=api;.;method=.=GET;.;cluster=.=backend;.;response_code=.=200;.;\
                 response_code_class=.=2xx;.;mesh_requests_total",
                "route=.=api;.;method=.=GET;.;cluster=.=backend;.;response_code=.=503;.;\
                 response_code_class=.=5xx;.;mesh_requests_total",
            ]
        );
        assert_eq!(r.budget.count(&store), 3);
    }

    #[test]
    fn past_max_series_label_sets_fold_into_one_overflow_series() {
        let store = MemoryStore::new();
        let mut host = FakeHost::default();
        let mut r = registry_in(&store, r#"{"max_series": 4}"#, "t");
        let mut folded = 0;
        for i in 0..100 {
            let key = format!("r{i} GET c");
            folded += usize::from(r.gauge(&key, &store, &mut host).folded);
            folded += usize::from(r.series(&key, StatusKey(200), &store, &mut host).folded);
        }
        // 2 request sets + their 2 status sets fill the budget of 4.
        assert_eq!(folded, 2 * 100 - 4);
        assert_eq!(r.budget.count(&store), 4);
        let overflow: Vec<&String> = host
            .defined
            .iter()
            .filter(|n| n.contains("=overflow;"))
            .collect();
        assert_eq!(
            overflow,
            [
                "route=.=overflow;.;method=.=overflow;.;cluster=.=overflow;.;mesh_requests_in_flight",
                "route=.=overflow;.;method=.=overflow;.;cluster=.=overflow;.;\
                 response_code_class=.=overflow;.;mesh_requests_total"
            ]
        );
        assert_eq!(host.defined.len(), 4 + 2, "each series defined once");
        // An admitted set keeps its series after the budget is full.
        assert!(!r.gauge("r1 GET c", &store, &mut host).folded);
    }

    #[test]
    fn workers_share_the_budget_and_see_each_others_sets() {
        let store = MemoryStore::new();
        let (mut h1, mut h2) = (FakeHost::default(), FakeHost::default());
        let mut w1 = registry_in(&store, r#"{"max_series": 2}"#, "t");
        let mut w2 = registry_in(&store, r#"{"max_series": 2}"#, "t");
        assert!(!w1.gauge("a GET c", &store, &mut h1).folded);
        assert!(!w2.gauge("b GET c", &store, &mut h2).folded);
        assert!(w1.gauge("c GET c", &store, &mut h1).folded, "budget full");
        assert!(
            !w1.gauge("b GET c", &store, &mut h1).folded,
            "a set admitted by another worker is not folded"
        );
        // A worker configured later (or a reconfiguration) keeps the count.
        let mut w3 = registry_in(&store, r#"{"max_series": 2}"#, "t");
        assert!(w3.gauge("d GET c", &store, &mut h2).folded);
        // Another plugin instance has its own budget.
        let mut other = registry_in(&store, r#"{"max_series": 2}"#, "other");
        assert!(!other.gauge("z GET c", &store, &mut h1).folded);
    }

    #[test]
    fn a_response_without_a_request_phase_still_gets_a_series() {
        let store = MemoryStore::new();
        let mut host = FakeHost::default();
        let mut r = registry_in(&store, "{}", "t");
        let s = r.series("api unknown c", StatusKey(400), &store, &mut host);
        assert!(!s.folded);
        assert_eq!(r.budget.count(&store), 2);
    }

    proptest! {
        /// Whatever label sets several workers see, in any order, the number
        /// of series defined for real never exceeds max_series, and every
        /// request lands in exactly one series.
        #[test]
        fn the_series_bound_holds(
            max in 1u64..20,
            requests in prop::collection::vec((0usize..3, 0u32..40, 0u16..6), 1..300),
        ) {
            let store = MemoryStore::new();
            let json = format!(r#"{{"max_series": {max}, "labels": {{"status_code": true}}}}"#);
            let mut workers: Vec<(Registry<FakeHost>, FakeHost)> =
                (0..3).map(|_| (registry_in(&store, &json, "t"), FakeHost::default())).collect();
            let mut admitted = std::collections::HashSet::new();
            for (worker, set, status) in requests {
                let (r, host) = &mut workers[worker];
                let key = format!("r{set} GET c");
                let g = r.gauge(&key, &store, host);
                if !g.folded { admitted.insert(host.defined[g.ids].clone()); }
                let s = r.series(&key, StatusKey(200 + status), &store, host);
                if !s.folded { admitted.insert(host.defined[s.ids].clone()); }
            }
            prop_assert!(admitted.len() as u64 <= max);
            prop_assert!(store.len() as u64 <= max + 1);
        }
    }
}
