//! Time as the cores see it: nanoseconds on one clock shared by all workers
//! (Envoy's `proxy_get_current_time_nanoseconds`, wall time since the epoch).

use std::sync::atomic::{AtomicU64, Ordering};

pub trait Clock {
    fn now_nanos(&self) -> u64;
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn at(nanos: u64) -> Self {
        ManualClock(AtomicU64::new(nanos))
    }

    pub fn set(&self, nanos: u64) {
        self.0.store(nanos, Ordering::SeqCst);
    }

    pub fn advance(&self, by: std::time::Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
