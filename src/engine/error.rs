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
    /// A step that this request was part of failed (an error or a panic in the forward pass,
    /// sampling or bookkeeping); the engine went on serving other requests.
    #[error("the engine failed while computing this request: {0}")]
    StepFailed(String),
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
