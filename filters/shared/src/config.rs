//! What configuration reading yields besides the compiled configs: the error
//! (with the JSON path of the bad field) and the shared local-answer shape.
//! The reading itself is serde's, through [`crate::spec`].

use std::fmt;

/// A configuration problem at one place in the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path such as `rules[2].limit.per`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "configuration: {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A filter's own answer (ratelimit's 429, circuit-breaker's 503...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub body: String,
}
