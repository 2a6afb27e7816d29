//! Circuit status shared between filters: the circuit-breaker filter publishes
//! the state of each per-cluster breaker here; lb-hints reads it to skip
//! targets whose circuit is open. Both filters must run with the same `vm_id`
//! (shared data is scoped by `vm_id`). This module is the whole contract.

use crate::store::SharedStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// What one breaker publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitStatus {
    pub state: CircuitState,
    /// While `Open`: when it may move to half-open (clock nanoseconds).
    pub open_until: u64,
}

/// Shared-data key of the published status of the breaker for `cluster`.
pub fn status_key(cluster: &str) -> String {
    format!("mesh.circuit.cluster.{cluster}")
}

impl CircuitStatus {
    pub fn encode(&self) -> [u8; 9] {
        let t = self.open_until.to_le_bytes();
        [
            self.state as u8,
            t[0],
            t[1],
            t[2],
            t[3],
            t[4],
            t[5],
            t[6],
            t[7],
        ]
    }

    pub fn decode(bytes: &[u8]) -> Option<CircuitStatus> {
        let (&state, rest) = bytes.split_first()?;
        let state = match state {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            _ => return None,
        };
        let open_until = u64::from_le_bytes(rest.try_into().ok()?);
        Some(CircuitStatus { state, open_until })
    }
}

/// Publishes `status` for `cluster` (last writer wins: a status is a report,
/// the breaker's own state stays in the circuit-breaker's keys).
pub fn publish(store: &dyn SharedStore, cluster: &str, status: CircuitStatus) {
    let _ = store.set(&status_key(cluster), &status.encode(), None);
}

/// Whether the breaker for `cluster` is open at `now` (no status: closed).
pub fn is_open(store: &dyn SharedStore, cluster: &str, now: u64) -> bool {
    store
        .get(&status_key(cluster))
        .and_then(|(bytes, _)| CircuitStatus::decode(&bytes))
        .is_some_and(|s| s.state == CircuitState::Open && now < s.open_until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn round_trip_and_open_check() {
        let s = MemoryStore::new();
        assert!(!is_open(&s, "v2", 10));
        publish(
            &s,
            "v2",
            CircuitStatus {
                state: CircuitState::Open,
                open_until: 100,
            },
        );
        assert!(is_open(&s, "v2", 10));
        assert!(
            !is_open(&s, "v2", 100),
            "past open_until the breaker is due for half-open"
        );
        assert!(!is_open(&s, "v1", 10));
        publish(
            &s,
            "v2",
            CircuitStatus {
                state: CircuitState::Closed,
                open_until: 0,
            },
        );
        assert!(!is_open(&s, "v2", 10));
        assert_eq!(CircuitStatus::decode(&[7; 9]), None);
    }
}
