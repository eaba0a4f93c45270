//! Decode-worker errors.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the engine thread has stopped")]
    EngineStopped,
    #[error("could not start the engine thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    RequestPlane(#[from] runtime::request_plane::RequestPlaneError),
    #[error(transparent)]
    Discovery(#[from] runtime::discovery::DiscoveryError),
}
