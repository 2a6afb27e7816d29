//! The few messages of Envoy's rate limit service v3 (RLS) that the global
//! mode sends and reads, with `prost` derives (field numbers and types as in
//! `envoy/service/ratelimit/v3/rls.proto` and
//! `envoy/extensions/common/ratelimit/v3/ratelimit.proto`). Only the fields we
//! use are declared: prost skips the others when decoding.
//!
//! Also `GrpcService` (`envoy/config/core/v3/grpc_service.proto`): proxy-wasm's
//! gRPC call takes either a bare cluster name or a serialized `GrpcService`.
//! We always send the message, so a cluster name that happens to parse as
//! protobuf bytes cannot be misread, and Envoy never takes the bare-name path
//! that answers a missing cluster with a status the SDK panics on.

use prost::Message;

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `envoy.service.ratelimit.v3.RateLimitRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// 0 means 1.
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

/// `RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    Unknown = 0,
    Ok = 1,
    OverLimit = 2,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    #[prost(enumeration = "Code", tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

/// `RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<ProtoDuration>,
}

/// `RateLimitResponse.RateLimit.Unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Unit {
    Unknown = 0,
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

impl Unit {
    /// The window in seconds (a month as 30 days, a year as 365: only for headers).
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Unknown => 0,
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }
}

/// `RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(enumeration = "Unit", tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl ProtoDuration {
    /// Nanoseconds; negative or absurd values read as 0 / saturate.
    pub fn nanos(&self) -> u64 {
        let secs = u64::try_from(self.seconds).unwrap_or(0);
        let nanos = u64::try_from(self.nanos).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    }
}

/// `envoy.config.core.v3.GrpcService` with only `envoy_grpc` set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GrpcService {
    #[prost(message, optional, tag = "1")]
    pub envoy_grpc: Option<EnvoyGrpc>,
}

/// `GrpcService.EnvoyGrpc`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    pub cluster_name: String,
}

/// The serialized `GrpcService` naming `cluster` (proxy-wasm's "upstream").
pub fn grpc_service(cluster: &str) -> Vec<u8> {
    GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_string(),
        }),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_are_the_proto_encoding() {
        let req = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "k".into(),
                    value: "v".into(),
                }],
            }],
            hits_addend: 0,
        };
        // field 1 "d"; field 2 { field 1 { field 1 "k", field 2 "v" } }
        assert_eq!(
            req.encode_to_vec(),
            [0x0a, 1, b'd', 0x12, 8, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v']
        );
        assert_eq!(grpc_service("rls"), [0x0a, 5, 0x0a, 3, b'r', b'l', b's']);
    }

    #[test]
    fn a_response_decodes_and_skips_fields_we_do_not_declare() {
        let status = DescriptorStatus {
            code: Code::OverLimit as i32,
            current_limit: Some(RateLimit {
                requests_per_unit: 10,
                unit: Unit::Hour as i32,
                name: String::new(),
            }),
            limit_remaining: 0,
            duration_until_reset: Some(ProtoDuration {
                seconds: 12,
                nanos: 5,
            }),
        };
        let mut bytes = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![status.clone()],
        }
        .encode_to_vec();
        // response_headers_to_add (field 3) and raw_body (field 5): unknown to us.
        bytes.extend_from_slice(&[0x1a, 2, 0x0a, 0, 0x2a, 1, b'x']);
        let got = RateLimitResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(got.overall_code, Code::OverLimit as i32);
        assert_eq!(got.statuses, vec![status]);
        assert_eq!(
            got.statuses[0].duration_until_reset.unwrap().nanos(),
            12_000_000_005
        );
    }
}
