//! Engine-side errors: loading, device failures and capacity problems.

/// Everything that can go wrong below the HTTP layer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded; the message names the file and the problem.
    #[error("failed to load model: {0}")]
    Load(String),
    /// A tensor operation failed on the device.
    #[error("device error: {0}")]
    Device(String),
    /// The request can never fit into the KV memory, even alone.
    #[error(
        "request needs {needed} KV blocks but the pool only has {total}; raise --kv-memory or shorten the request"
    )]
    TooLargeForKvPool {
        /// Blocks the request needs at its maximum length.
        needed: usize,
        /// Blocks in the whole pool.
        total: usize,
    },
    /// The request waited in the queue longer than allowed.
    #[error("request waited {waited_ms} ms in the queue without being scheduled (queue timeout {limit_ms} ms); the server is overloaded, retry later")]
    QueueTimeout {
        /// How long it waited.
        waited_ms: u64,
        /// The configured limit.
        limit_ms: u64,
    },
    /// The engine thread is gone (shut down or crashed).
    #[error("engine unavailable")]
    Unavailable,
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Device(e.to_string())
    }
}
