//! Typed errors of the relay library.

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("config: {0}")]
    Config(String),
    #[error("rack state {path}: {msg}")]
    State { path: String, msg: String },
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
}
