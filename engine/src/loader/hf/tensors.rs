//! The safetensors weights of a Hugging Face folder: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` maps tensor names to. Files are memory-mapped and each tensor is
//! copied into a tch tensor under its Hugging Face name, in its stored dtype.
//!
//! FP8 (compressed-tensors) weights arrive as an `F8_E4M3` `x.weight` with a per-output-channel
//! `x.weight_scale`; the pair becomes one [`WeightTensor::Fp8`]. Static activation scales
//! (`input_scale`) and KV-cache scales are not used by the engine and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use super::header;
use super::json::{self, Object};
use super::quant::Quantization;
use crate::error::{EngineError, Result};
use crate::weights::{WeightTensor, Weights};

/// The single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tensors a checkpoint may carry that the model does not use.
const SKIPPED_SUFFIXES: &[&str] = &[
    ".input_scale",
    ".output_scale",
    ".k_scale",
    ".v_scale",
    "rotary_emb.inv_freq",
];

/// A safetensors file to read and the tensors the index promises it holds.
struct Shard {
    path: PathBuf,
    expected: Vec<String>,
}

/// Loads every tensor of the checkpoint in `dir`.
pub fn load(dir: &Path, quant: &Quantization) -> Result<Weights> {
    let shards = shards(dir)?;
    let maps = shards
        .iter()
        .map(|shard| map_file(&shard.path))
        .collect::<Result<Vec<_>>>()?;
    let mut views: BTreeMap<String, (TensorView<'_>, &Path)> = BTreeMap::new();
    for (shard, map) in shards.iter().zip(&maps) {
        let file = SafeTensors::deserialize(map)
            .map_err(|e| invalid(&shard.path, header::explain(map, &e)))?;
        let tensors = file.tensors();
        let names: BTreeSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(missing) = shard.expected.iter().find(|n| !names.contains(n.as_str())) {
            return Err(invalid(
                &shard.path,
                format!("it has no tensor `{missing}`, though `{INDEX_FILE}` maps it there"),
            ));
        }
        for (name, view) in tensors {
            if let Some((_, other)) = views.get(&name) {
                return Err(invalid(
                    &shard.path,
                    format!("tensor `{name}` is also in `{}`", other.display()),
                ));
            }
            views.insert(name, (view, &shard.path));
        }
    }

    let mut weights = Weights::default();
    for (name, (view, path)) in &views {
        if SKIPPED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            tracing::debug!(tensor = %name, "skipping a tensor the Llama model does not use");
            continue;
        }
        if let Some(weight) = name
            .strip_suffix("_scale")
            .filter(|w| w.ends_with(".weight"))
        {
            if views.get(weight).map(|(v, _)| v.dtype()) != Some(Dtype::F8_E4M3) {
                tracing::debug!(tensor = %name, "skipping a weight scale without an FP8 weight");
            }
            continue;
        }
        let tensor = match view.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => WeightTensor::Dense(dense(name, view)?),
            Dtype::F8_E4M3 => fp8(name, view, path, &views, quant)?,
            other => return Err(unsupported(other, name)),
        };
        weights.insert(name.clone(), tensor);
    }
    Ok(weights)
}

/// The files to read: `model.safetensors`, else the shards of `model.safetensors.index.json`.
fn shards(dir: &Path) -> Result<Vec<Shard>> {
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    if single.exists() || !index.exists() {
        // A folder with neither reports the single file as missing.
        return Ok(vec![Shard {
            path: single,
            expected: Vec::new(),
        }]);
    }
    let map = json::read_object(&index)?;
    let weight_map: BTreeMap<String, String> =
        Object::new(INDEX_FILE, &map).require("weight_map")?;
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in weight_map {
        by_file.entry(file).or_default().push(tensor);
    }
    Ok(by_file
        .into_iter()
        .map(|(file, expected)| Shard {
            path: dir.join(file),
            expected,
        })
        .collect())
}

fn map_file(path: &Path) -> Result<Mmap> {
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and every tensor is copied out before it is dropped; as with
    // every mmap-based loader, another process truncating the file meanwhile would fault.
    unsafe { Mmap::map(&file) }.map_err(io)
}

fn invalid(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidSafetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn unsupported(dtype: Dtype, tensor: &str) -> EngineError {
    EngineError::UnsupportedTensorType {
        kind: format!("{dtype:?}"),
        tensor: tensor.to_string(),
    }
}

fn shape(view: &TensorView) -> Vec<i64> {
    view.shape().iter().map(|&d| d as i64).collect()
}

/// Copies an f32, f16 or bf16 tensor, keeping its dtype.
fn dense(name: &str, view: &TensorView) -> Result<Tensor> {
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        other => return Err(unsupported(other, name)),
    };
    Ok(Tensor::f_from_data_size(view.data(), &shape(view), kind)?)
}

/// An `F8_E4M3` `[out, in]` weight with its `[out, 1]` (or `[out]`) scale.
fn fp8(
    name: &str,
    view: &TensorView,
    path: &Path,
    views: &BTreeMap<String, (TensorView, &Path)>,
    quant: &Quantization,
) -> Result<WeightTensor> {
    if *quant == Quantization::None {
        return Err(EngineError::UnsupportedTensorType {
            kind: "F8_E4M3 (config.json declares no compressed-tensors FP8 quantization_config)"
                .to_string(),
            tensor: name.to_string(),
        });
    }
    let Some(layer) = name.strip_suffix(".weight") else {
        return Err(unsupported(Dtype::F8_E4M3, name));
    };
    if quant.ignores(layer) {
        return Err(invalid(
            path,
            format!("`{name}` is F8_E4M3, but `quantization_config.ignore` lists `{layer}`"),
        ));
    }
    let dims = shape(view);
    let &[out, _] = dims.as_slice() else {
        return Err(invalid(
            path,
            format!("FP8 weight `{name}` has shape {dims:?}, expected [out, in]"),
        ));
    };
    let scale_name = format!("{name}_scale");
    let (scale_view, _) = views
        .get(&scale_name)
        .ok_or_else(|| EngineError::MissingTensor(scale_name.clone()))?;
    let scale_dims = shape(scale_view);
    if scale_dims != [out, 1] && scale_dims != [out] {
        return Err(EngineError::ShapeMismatch {
            name: scale_name,
            expected: vec![out, 1],
            actual: scale_dims,
        });
    }
    let scale = dense(&scale_name, scale_view)?
        .f_to_kind(Kind::Float)?
        .f_reshape([out, 1])?;
    let weight = Tensor::f_from_data_size(view.data(), &dims, Kind::Float8e4m3fn)?;
    Ok(WeightTensor::Fp8 { weight, scale })
}
