//! Loaded weight tensors, keyed by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).

use std::collections::{HashMap, HashSet};

use tch::Tensor;

use crate::error::{EngineError, Result};

/// One weight as a loader produced it.
pub enum WeightTensor {
    /// Plain floating-point tensor (f32, f16 or bf16; GGUF quants arrive dequantized to f32).
    Dense(Tensor),
    /// FP8 (`float8_e4m3fn`) `[out, in]` weight with a per-output-channel scale `[out, 1]`.
    Fp8 { weight: Tensor, scale: Tensor },
}

impl WeightTensor {
    pub fn size(&self) -> Vec<i64> {
        match self {
            WeightTensor::Dense(t) => t.size(),
            WeightTensor::Fp8 { weight, .. } => weight.size(),
        }
    }

    /// The weight as a dense tensor of `kind`; FP8 is multiplied out by its scales.
    pub fn dequantize(&self, kind: tch::Kind) -> Tensor {
        match self {
            WeightTensor::Dense(t) => t.to_kind(kind),
            WeightTensor::Fp8 { weight, scale } => {
                (weight.to_kind(tch::Kind::Float) * scale.to_kind(tch::Kind::Float)).to_kind(kind)
            }
        }
    }
}

#[derive(Default)]
pub struct Weights {
    tensors: HashMap<String, WeightTensor>,
}

impl Weights {
    pub fn insert(&mut self, name: impl Into<String>, tensor: WeightTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&WeightTensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// How many distinct layers (`model.layers.{i}.…`) have at least one tensor: a config that
    /// claims more is wrong.
    pub fn layer_count(&self) -> usize {
        let layers: HashSet<&str> = self
            .names()
            .filter_map(|n| n.strip_prefix("model.layers.")?.split_once('.'))
            .map(|(layer, _)| layer)
            .collect();
        layers.len()
    }

    /// Removes and returns `name`, checking its shape.
    pub fn take(&mut self, name: &str, expected: &[i64]) -> Result<WeightTensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        let actual = t.size();
        if actual != expected {
            return Err(EngineError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual,
            });
        }
        Ok(t)
    }
}
