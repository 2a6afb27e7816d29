//! Helpers shared by several integration-test files (not a test target itself).

pub mod skopeo;
