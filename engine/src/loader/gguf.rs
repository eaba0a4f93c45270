//! TODO(gguf helper): replace this stub.
use std::path::Path;
use super::LoadedModel;
use crate::error::{EngineError, Result};
pub fn load(path: &Path) -> Result<LoadedModel> {
    Err(EngineError::ModelNotFound(path.display().to_string()))
}
