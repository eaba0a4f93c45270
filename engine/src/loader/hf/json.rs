//! Typed reads of the JSON files in a Hugging Face folder, where every error names the file and
//! the key (serde's own messages name a missing field but not an ill-typed one).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// Reads `path` as a JSON object; a missing or unreadable file is an I/O error naming it.
pub fn read_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(EngineError::InvalidConfig(format!(
            "`{}` is not a JSON object",
            path.display()
        ))),
        Err(e) => Err(EngineError::InvalidConfig(format!(
            "`{}` is not valid JSON: {e}",
            path.display()
        ))),
    }
}

/// Like [`read_object`], but `None` when the file does not exist.
pub fn read_optional_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if path.exists() {
        read_object(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A JSON object read from `file`; `prefix` is the path of the object inside the file
/// (`rope_scaling.`), so errors name keys as written there.
pub struct Object<'a> {
    file: &'a str,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Object<'a> {
    pub fn new(file: &'a str, map: &'a Map<String, Value>) -> Self {
        Object {
            file,
            prefix: String::new(),
            map,
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The value of `key`, `None` when it is absent or `null`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => T::deserialize(value).map(Some).map_err(|e| {
                EngineError::InvalidConfig(format!("`{}` in {}: {e}", self.key(key), self.file))
            }),
        }
    }

    /// The value of `key`, which must be present.
    pub fn require<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.get(key)?.ok_or_else(|| {
            EngineError::InvalidConfig(format!("`{}` is missing from {}", self.key(key), self.file))
        })
    }

    /// The object under `key`, `None` when it is absent or `null`.
    pub fn object(&self, key: &str) -> Result<Option<Object<'a>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Object {
                file: self.file,
                prefix: format!("{}.", self.key(key)),
                map,
            })),
            Some(other) => Err(EngineError::InvalidConfig(format!(
                "`{}` in {} must be an object, not `{other}`",
                self.key(key),
                self.file
            ))),
        }
    }

    /// Every entry that is itself an object (`config_groups.group_0`, ...), in key order.
    pub fn objects(&self) -> Result<Vec<(&'a str, Object<'a>)>> {
        self.map
            .keys()
            .map(|k| {
                let inner = self.object(k)?.ok_or_else(|| {
                    EngineError::InvalidConfig(format!(
                        "`{}` in {} must be an object",
                        self.key(k),
                        self.file
                    ))
                })?;
                Ok((k.as_str(), inner))
            })
            .collect()
    }
}

/// `5` or `[5, 7]`: how configs give token ids.
#[derive(serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}
