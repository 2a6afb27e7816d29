//! The global mode of a rule: the limit is shared by every Envoy through an
//! RLS v3 service (envoyproxy/ratelimit on Redis, or any other).
//!
//! Pure logic only: the descriptor a request sends, the request bytes, the
//! verdict from a decoded answer (or a failed call), and the over-limit
//! answers remembered in shared data so later requests for that key are
//! rejected without a call. The adapter makes the call.

use std::time::Duration;

use prost::Message;

use mesh_shared::config::LocalResponse;
use mesh_shared::store::SharedStore;
use mesh_shared::{Attribute, Source};

use crate::rls::{self, Code, RateLimitResponse, Unit};
use crate::table::KeyTable;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);
/// Upper bound for `timeout`: a request waits this long at most.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for `max_batch`: descriptors in one call.
pub const MAX_BATCH: u64 = 1000;

/// The compiled `global` block of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    /// The Envoy cluster (HTTP/2) of the RLS server.
    pub service: String,
    /// The serialized `GrpcService` naming that cluster (what the call takes).
    pub grpc_service: Vec<u8>,
    pub domain: String,
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    /// The answer when the call fails and `failure_mode` is `deny`.
    pub failure_response: LocalResponse,
    /// Descriptors per call (1: every request its own call; see `batch.rs`).
    pub max_batch: usize,
    /// `OVER_LIMIT` answers remembered per key, until their reset.
    pub remembered: KeyTable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// The request goes on (counted as `failed_open`).
    Allow,
    /// The request is answered with `failure_response` (counted as `failure_denied`).
    Deny,
}

/// What the service said about one descriptor, for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStatus {
    /// `current_limit.requests_per_unit` (0: the service named no limit).
    pub limit: u32,
    /// `current_limit.unit` in seconds (0: unknown).
    pub window_secs: u64,
    pub remaining: u32,
    /// `duration_until_reset` in nanoseconds.
    pub reset_after: u64,
}

/// The key name a key part is sent under in the descriptor.
pub fn entry_key(part: &Source) -> &str {
    match part {
        Source::Header(name) | Source::Cookie(name) => name,
        Source::Static(_) => "static",
        Source::Attribute(Attribute::ClientIp) => "remote_address",
        Source::Attribute(a) => a.name(),
    }
}

/// A request's descriptor: `("rule", <rule name>)` then one entry per key
/// part (`values` in the order of the rule's key).
pub fn descriptor(rule: &str, key: &[Source], values: &[Vec<u8>]) -> rls::RateLimitDescriptor {
    let mut entries = Vec::with_capacity(key.len() + 1);
    entries.push(rls::Entry {
        key: "rule".to_string(),
        value: rule.to_string(),
    });
    for (part, value) in key.iter().zip(values) {
        entries.push(rls::Entry {
            key: entry_key(part).to_string(),
            // RLS entries are proto strings (UTF-8); other bytes are replaced.
            value: String::from_utf8_lossy(value).into_owned(),
        });
    }
    rls::RateLimitDescriptor { entries }
}

/// The request bytes: the descriptors of one request, or of a batch (one
/// each, in the order their statuses come back).
pub fn request_bytes(domain: &str, descriptors: Vec<rls::RateLimitDescriptor>) -> Vec<u8> {
    rls::RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: 0,
    }
    .encode_to_vec()
}

/// The service's answer, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok(Option<ServiceStatus>),
    OverLimit(ServiceStatus),
    /// Undecodable, or `UNKNOWN`: treated as a failed call.
    Invalid,
}

/// Reads a `RateLimitResponse`.
pub fn read_answer(bytes: &[u8]) -> Answer {
    let Ok(resp) = RateLimitResponse::decode(bytes) else {
        return Answer::Invalid;
    };
    let status = resp.statuses.first().map(service_status);
    match Code::try_from(resp.overall_code) {
        Ok(Code::Ok) => Answer::Ok(status.filter(|s| s.limit > 0)),
        Ok(Code::OverLimit) => Answer::OverLimit(status.unwrap_or(ServiceStatus {
            limit: 0,
            window_secs: 0,
            remaining: 0,
            reset_after: 0,
        })),
        _ => Answer::Invalid,
    }
}

/// Reads the answer to a batched call of `n` descriptors: one answer each,
/// from its own `DescriptorStatus`. An answer without one status per
/// descriptor cannot be matched to the requests: all `Invalid`, unless the
/// overall code is `OK` (then no descriptor is over its limit).
pub fn read_answers(bytes: &[u8], n: usize) -> Vec<Answer> {
    let Ok(resp) = RateLimitResponse::decode(bytes) else {
        return vec![Answer::Invalid; n];
    };
    let overall = Code::try_from(resp.overall_code);
    if resp.statuses.len() != n {
        let each = match overall {
            Ok(Code::Ok) => Answer::Ok(None),
            _ => Answer::Invalid,
        };
        return vec![each; n];
    }
    if !matches!(overall, Ok(Code::Ok | Code::OverLimit)) {
        return vec![Answer::Invalid; n];
    }
    resp.statuses
        .iter()
        .map(|s| {
            let status = service_status(s);
            match Code::try_from(s.code) {
                Ok(Code::Ok) => Answer::Ok(Some(status).filter(|s| s.limit > 0)),
                Ok(Code::OverLimit) => Answer::OverLimit(status),
                _ => Answer::Invalid,
            }
        })
        .collect()
}

fn service_status(s: &rls::DescriptorStatus) -> ServiceStatus {
    ServiceStatus {
        limit: s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit),
        window_secs: s
            .current_limit
            .as_ref()
            .and_then(|l| Unit::try_from(l.unit).ok())
            .map_or(0, Unit::seconds),
        remaining: s.limit_remaining,
        reset_after: s.duration_until_reset.map_or(0, |d| d.nanos()),
    }
}

/// Why a call ended `UNAVAILABLE`, for the log: Envoy's message, and what
/// it means when Envoy reset the stream on a protocol error. That is how a
/// cluster without HTTP/2 shows: Envoy does not check the cluster's protocol
/// for a gRPC call, it sends the call over HTTP/1.1 and the gRPC server
/// drops it (seen with envoyproxy/ratelimit in Envoy 1.40).
pub fn unavailable_reason(message: &str, service: &str) -> String {
    if message.contains("protocol error") {
        format!(
            "unavailable: {message} (does cluster \"{service}\" speak HTTP/2? gRPC needs \
             http2_protocol_options, or an Istio port named grpc)"
        )
    } else {
        format!("unavailable: {message}")
    }
}

/// Per rule, the time (whole seconds) until which an `OVER_LIMIT` answer may
/// be remembered for some key, kept where every worker reads it for much less
/// than a shared-data read of the remembered table (in Envoy: a gauge). It
/// may run ahead of the truth, never behind, so a request that finds it past
/// has nothing remembered to look up: under traffic that is never over its
/// limit no request reads the table.
pub trait RememberedUntil {
    /// The time in seconds, or `None` if unknown (then the table is read).
    fn get(&self, rule: usize) -> Option<u64>;
    /// Raises it to at least `secs` (before the answer is written to the table).
    fn raise(&self, rule: usize, secs: u64);
}

/// No such time is kept: every request of a global rule reads the table.
pub struct AlwaysLookUp;

impl RememberedUntil for AlwaysLookUp {
    fn get(&self, _rule: usize) -> Option<u64> {
        None
    }
    fn raise(&self, _rule: usize, _secs: u64) {}
}

/// Whether something may be remembered for rule `rule` at `now`.
pub fn may_be_remembered(hint: &dyn RememberedUntil, rule: usize, now: u64) -> bool {
    hint.get(rule)
        .is_none_or(|secs| secs.saturating_mul(1_000_000_000) > now)
}

/// Remembers an `OVER_LIMIT` answer for key `fp` of rule `rule` until
/// `now + reset_after` (nothing to remember without a reset time). The limit
/// and window ride along so remembered rejections carry the same headers.
pub fn remember(
    global: &Global,
    store: &dyn SharedStore,
    hint: &dyn RememberedUntil,
    (rule, fp): (usize, u64),
    status: &ServiceStatus,
    now: u64,
) {
    if status.reset_after == 0 {
        return;
    }
    let until = now.saturating_add(status.reset_after);
    hint.raise(rule, until.div_ceil(1_000_000_000));
    let window = u32::try_from(status.window_secs).unwrap_or(u32::MAX);
    let mut extra = [0u8; 8];
    let (limit, window_bytes) = extra.split_at_mut(4);
    limit.copy_from_slice(&status.limit.to_le_bytes());
    window_bytes.copy_from_slice(&window.to_le_bytes());
    global.remembered.remember(store, fp, until, extra, now);
}

/// A remembered `OVER_LIMIT` for key `fp` still in force at `now`.
pub fn remembered(
    global: &Global,
    store: &dyn SharedStore,
    fp: u64,
    now: u64,
) -> Option<ServiceStatus> {
    let (until, extra) = global.remembered.recall(store, fp, now)?;
    let word = |i: usize| {
        extra
            .get(i..i + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    Some(ServiceStatus {
        limit: word(0),
        window_secs: u64::from(word(4)),
        remaining: 0,
        reset_after: until - now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::{DescriptorStatus, ProtoDuration, RateLimit};
    use mesh_shared::store::MemoryStore;
    use proptest::prelude::*;

    fn global() -> Global {
        Global {
            service: "rls".into(),
            grpc_service: rls::grpc_service("rls"),
            domain: "mesh".into(),
            timeout: DEFAULT_TIMEOUT,
            failure_mode: FailureMode::Allow,
            failure_response: LocalResponse {
                status: 503,
                body: "x".into(),
            },
            max_batch: 1,
            remembered: KeyTable::remembered("t.over.".into(), 64),
        }
    }

    fn answer(code: Code, limit: u32, remaining: u32, reset_secs: i64) -> Vec<u8> {
        RateLimitResponse {
            overall_code: code as i32,
            statuses: vec![DescriptorStatus {
                code: code as i32,
                current_limit: Some(RateLimit {
                    requests_per_unit: limit,
                    unit: Unit::Hour as i32,
                    name: String::new(),
                }),
                limit_remaining: remaining,
                duration_until_reset: Some(ProtoDuration {
                    seconds: reset_secs,
                    nanos: 0,
                }),
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn the_descriptor_names_the_rule_then_each_key_part() {
        let key = vec![
            Source::Header("x-user".into()),
            Source::Attribute(Attribute::ClientIp),
            Source::Attribute(Attribute::Path),
            Source::Cookie("session".into()),
            Source::Static("tier-1".into()),
        ];
        let values: Vec<Vec<u8>> = ["alice", "10.0.0.1", "/api", "s1", "tier-1"]
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let bytes = request_bytes("mesh", vec![descriptor("per-user", &key, &values)]);
        let req = rls::RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(req.domain, "mesh");
        let entries: Vec<(&str, &str)> = req.descriptors[0]
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            entries,
            [
                ("rule", "per-user"),
                ("x-user", "alice"),
                ("remote_address", "10.0.0.1"),
                ("path", "/api"),
                ("session", "s1"),
                ("static", "tier-1"),
            ]
        );
    }

    #[test]
    fn answers_are_read() {
        let status = ServiceStatus {
            limit: 10,
            window_secs: 3600,
            remaining: 0,
            reset_after: 30_000_000_000,
        };
        assert_eq!(
            read_answer(&answer(Code::OverLimit, 10, 0, 30)),
            Answer::OverLimit(status)
        );
        assert_eq!(
            read_answer(&answer(Code::Ok, 10, 4, 30)),
            Answer::Ok(Some(ServiceStatus {
                remaining: 4,
                ..status
            }))
        );
        assert_eq!(
            read_answer(&answer(Code::Unknown, 10, 4, 30)),
            Answer::Invalid
        );
        assert_eq!(read_answer(b"\xff\xff\xff"), Answer::Invalid);
        // OK with no limit configured for the descriptor: no headers to give.
        let bare = RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            }],
        };
        assert_eq!(read_answer(&bare.encode_to_vec()), Answer::Ok(None));
    }

    #[test]
    fn a_batched_answer_decides_each_descriptor_by_its_own_status() {
        let status = |code: Code, remaining: u32| DescriptorStatus {
            code: code as i32,
            current_limit: Some(RateLimit {
                requests_per_unit: 10,
                unit: Unit::Minute as i32,
                name: String::new(),
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(ProtoDuration {
                seconds: 7,
                nanos: 0,
            }),
        };
        let answer = |overall: Code, statuses: Vec<DescriptorStatus>| {
            RateLimitResponse {
                overall_code: overall as i32,
                statuses,
            }
            .encode_to_vec()
        };
        let numbers = |remaining| ServiceStatus {
            limit: 10,
            window_secs: 60,
            remaining,
            reset_after: 7_000_000_000,
        };
        let mixed = answer(
            Code::OverLimit,
            vec![
                status(Code::Ok, 3),
                status(Code::OverLimit, 0),
                status(Code::Ok, 2),
            ],
        );
        assert_eq!(
            read_answers(&mixed, 3),
            [
                Answer::Ok(Some(numbers(3))),
                Answer::OverLimit(numbers(0)),
                Answer::Ok(Some(numbers(2)))
            ]
        );
        // Statuses that cannot be matched to the requests.
        assert_eq!(read_answers(&mixed, 2), [Answer::Invalid; 2]);
        assert_eq!(
            read_answers(&answer(Code::Ok, vec![]), 2),
            [Answer::Ok(None); 2],
            "overall OK without statuses: none is over"
        );
        let unknown = answer(Code::Unknown, vec![status(Code::Ok, 1)]);
        assert_eq!(read_answers(&unknown, 1), [Answer::Invalid]);
        assert_eq!(read_answers(b"\xff\xff", 2), [Answer::Invalid; 2]);
    }

    #[test]
    fn an_over_limit_is_remembered_until_its_reset_for_that_key_only() {
        let g = global();
        let store = MemoryStore::new();
        g.remembered.create(&store);
        let now = 1_000 * 1_000_000_000;
        let status = ServiceStatus {
            limit: 10,
            window_secs: 60,
            remaining: 0,
            reset_after: 5_000_000_000,
        };
        remember(&g, &store, &AlwaysLookUp, (0, 42), &status, now);
        assert_eq!(
            remembered(&g, &store, 42, now + 1),
            Some(ServiceStatus {
                reset_after: 4_999_999_999,
                ..status
            })
        );
        assert_eq!(remembered(&g, &store, 43, now + 1), None, "another key");
        assert_eq!(
            remembered(&g, &store, 42, now + 5_000_000_000),
            None,
            "reset"
        );
    }

    #[test]
    fn a_protocol_error_says_the_cluster_may_lack_http2() {
        let reset = "upstream connect error or disconnect/reset before headers. reset reason: protocol error";
        assert_eq!(
            unavailable_reason(reset, "rls"),
            format!("unavailable: {reset} (does cluster \"rls\" speak HTTP/2? gRPC needs http2_protocol_options, or an Istio port named grpc)")
        );
        let refused = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure";
        assert_eq!(
            unavailable_reason(refused, "rls"),
            format!("unavailable: {refused}")
        );
    }

    proptest! {
        #[test]
        fn any_bytes_read_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), n in 0usize..5) {
            let _ = read_answer(&bytes);
            prop_assert_eq!(read_answers(&bytes, n).len(), n);
        }

        #[test]
        fn remembered_never_outlives_its_reset(
            keys in proptest::collection::vec((1u64..200, 1u64..10_000_000_000), 1..200),
            probe in 0u64..20_000_000_000,
        ) {
            let g = global();
            let store = MemoryStore::new();
            g.remembered.create(&store);
            let now = 1_000_000_000_000;
            let mut until = std::collections::HashMap::new();
            for (fp, reset) in &keys {
                let status = ServiceStatus { limit: 1, window_secs: 1, remaining: 0, reset_after: *reset };
                remember(&g, &store, &AlwaysLookUp, (0, *fp), &status, now);
                let e = until.entry(*fp).or_insert(0u64);
                *e = (*e).max(now + reset);
            }
            for fp in until.keys() {
                if let Some(s) = remembered(&g, &store, *fp, now + probe) {
                    // Only while in force, and never longer than the latest reset given.
                    prop_assert!(now + probe < until[fp]);
                    prop_assert!(now + probe + s.reset_after <= until[fp]);
                }
            }
        }
    }
}
