//! [`Error`]: what can go wrong talking to Redis. Messages never hold the
//! Redis URL's credentials.

use vault_core::policy::LimiterError;

/// A Redis failure, with its credentials redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid (e.g. a malformed URL).
    #[error("redis configuration: {0}")]
    Config(String),
    /// Redis cannot be reached, dropped the connection, or did not answer
    /// in time; or it failed a moment ago and is not tried again yet.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error or something unexpected.
    #[error("redis error: {0}")]
    Protocol(String),
}

impl From<Error> for LimiterError {
    fn from(e: Error) -> LimiterError {
        match e {
            Error::Unavailable(m) => LimiterError::Unavailable(m),
            Error::Config(m) | Error::Protocol(m) => LimiterError::Backend(m),
        }
    }
}
