//! Router errors.

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("no worker instance is available for `{0}`")]
    NoInstances(String),
    #[error("unknown routing policy `{0}` (use round-robin or random)")]
    UnknownPolicy(String),
    #[error(transparent)]
    RequestPlane(#[from] runtime::request_plane::RequestPlaneError),
    #[error(transparent)]
    Discovery(#[from] runtime::discovery::DiscoveryError),
}
