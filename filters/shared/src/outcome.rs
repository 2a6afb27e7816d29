//! What one upstream call turned out to be: success, slow, failure, or not
//! the upstream's doing. circuit-breaker judges its windows with it and
//! lb-hints its canary's intervals, so both count a call the same way.

/// What one call turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A success whose response headers came after the slow-call duration.
    Slow,
    /// A failure; slow or not (counted in the slow-call rate too when slow).
    Failure {
        slow: bool,
    },
    /// Not an upstream call after all (another filter answered, the client
    /// went away, or a reset with `failure_when.reset: false`): not counted.
    Ignored,
}

impl Outcome {
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure { .. })
    }

    pub fn is_slow(self) -> bool {
        matches!(self, Outcome::Slow | Outcome::Failure { slow: true })
    }

    /// The `outcome` label of the calls counters; `None` when ignored.
    pub fn label(self) -> Option<&'static str> {
        match self {
            Outcome::Success => Some("success"),
            Outcome::Slow => Some("slow"),
            Outcome::Failure { .. } => Some("failure"),
            Outcome::Ignored => None,
        }
    }
}

/// Which answers count as failures (circuit-breaker's `failure_when`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureWhen {
    /// Inclusive status ranges that count as failures (`5xx` is 500..=599).
    pub statuses: Vec<(u32, u32)>,
    /// A reset or timeout with no upstream status counts as a failure (else it is ignored).
    pub reset: bool,
}

impl Default for FailureWhen {
    /// `{"statuses": ["5xx"], "reset": true}`.
    fn default() -> Self {
        FailureWhen {
            statuses: vec![(500, 599)],
            reset: true,
        }
    }
}

impl FailureWhen {
    pub fn is_failure_status(&self, status: u32) -> bool {
        self.statuses
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

/// How the response looked to the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// `response.code`, if any.
    pub code: Option<u32>,
    /// `response.code_details` (`via_upstream` when the upstream answered).
    pub details: Option<&'a [u8]>,
    /// From request start to response headers; `None` if none came.
    pub duration_nanos: Option<u64>,
}

/// Whether Envoy's `response.code_details` says the upstream failed to answer.
/// Seen in Envoy 1.40: a reset is `upstream_reset_before_response_started{...}`
/// (503), a route timeout is `response_timeout` (504); per-try timeouts are
/// `upstream_per_try_timeout`, an empty cluster `no_healthy_upstream`.
/// Anything else without an upstream status (another filter's local reply,
/// `downstream_remote_disconnect`) is not the upstream's doing.
pub fn is_upstream_trouble(details: &[u8]) -> bool {
    details.starts_with(b"upstream_")
        || details == b"response_timeout"
        || details == b"no_healthy_upstream"
}

/// Classifies a finished call: failing as `failure_when` says, slow when its
/// response headers took longer than `slow_nanos`.
pub fn classify(
    failure_when: &FailureWhen,
    slow_nanos: Option<u64>,
    response: Response<'_>,
) -> Outcome {
    let slow = match (slow_nanos, response.duration_nanos) {
        // Longer than the threshold, as Resilience4j (`>`; the rates compare with `>=`).
        (Some(s), Some(d)) => d > s,
        _ => false,
    };
    let from_upstream = match response.details {
        Some(details) => details == b"via_upstream",
        // Without details, a status is taken as the upstream's.
        None => response.code.is_some(),
    };
    if let (true, Some(code), Some(_)) = (from_upstream, response.code, response.duration_nanos) {
        return if failure_when.is_failure_status(code) {
            Outcome::Failure { slow }
        } else if slow {
            Outcome::Slow
        } else {
            Outcome::Success
        };
    }
    // No upstream status: Envoy answered itself, or nothing was answered.
    let upstream_trouble = match response.details {
        Some(d) => is_upstream_trouble(d),
        None => true,
    };
    if upstream_trouble && failure_when.reset {
        Outcome::Failure { slow }
    } else {
        Outcome::Ignored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn upstream(code: u32, ms: u64) -> Response<'static> {
        Response {
            code: Some(code),
            details: Some(b"via_upstream"),
            duration_nanos: Some(ms * MS),
        }
    }

    #[test]
    fn statuses_resets_and_slowness() {
        let default = FailureWhen::default();
        let slow = Some(500 * MS);
        assert_eq!(
            classify(&default, slow, upstream(200, 499)),
            Outcome::Success
        );
        assert_eq!(
            classify(&default, slow, upstream(200, 500)),
            Outcome::Success
        );
        assert_eq!(classify(&default, slow, upstream(200, 501)), Outcome::Slow);
        assert_eq!(
            classify(&default, slow, upstream(503, 900)),
            Outcome::Failure { slow: true }
        );
        assert_eq!(
            classify(&default, None, upstream(200, 900)),
            Outcome::Success
        );
        let reset = Response {
            code: Some(503),
            details: Some(b"upstream_reset_before_response_started{connection_termination}"),
            duration_nanos: Some(MS),
        };
        assert_eq!(
            classify(&default, slow, reset),
            Outcome::Failure { slow: false }
        );
        let lenient = FailureWhen {
            statuses: vec![(500, 500)],
            reset: false,
        };
        assert_eq!(classify(&lenient, slow, reset), Outcome::Ignored);
        assert_eq!(classify(&lenient, slow, upstream(503, 1)), Outcome::Success);
        let other_filter = Response {
            code: Some(429),
            details: Some(b"ratelimited"),
            duration_nanos: Some(MS),
        };
        assert_eq!(classify(&default, slow, other_filter), Outcome::Ignored);
    }
}
