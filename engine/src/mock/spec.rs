//! What the mock engine simulates: a GPU's peak rates and a model's shape. The specs are the
//! vendors' published dense figures (no sparsity); the 70B is DeepSeek-R1-Distill-Llama-70B
//! with FP8 weights and FP8 KV, as the seed serves it.

/// Peak rates of one GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSpec {
    pub name: &'static str,
    /// Dense bf16 tensor-core FLOP/s.
    pub bf16_flops: f64,
    /// Dense fp8 tensor-core FLOP/s.
    pub fp8_flops: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bytes_per_s: f64,
    pub hbm_bytes: f64,
    /// NVLink bandwidth per direction, bytes/s.
    pub nvlink_bytes_per_s: f64,
}

pub const H100_SXM: GpuSpec = GpuSpec {
    name: "h100",
    bf16_flops: 989e12,
    fp8_flops: 1979e12,
    hbm_bytes_per_s: 3.35e12,
    hbm_bytes: 80e9,
    nvlink_bytes_per_s: 450e9,
};

pub const H200: GpuSpec = GpuSpec {
    name: "h200",
    bf16_flops: 989e12,
    fp8_flops: 1979e12,
    hbm_bytes_per_s: 4.8e12,
    hbm_bytes: 141e9,
    nvlink_bytes_per_s: 450e9,
};

impl GpuSpec {
    pub fn by_name(name: &str) -> Option<&'static GpuSpec> {
        match name {
            "h100" | "h100-sxm" => Some(&H100_SXM),
            "h200" => Some(&H200),
            _ => None,
        }
    }
}

/// The shape of a Llama-family model, as far as step time depends on it.
#[derive(Clone, Debug, PartialEq)]
pub struct MockModel {
    pub name: String,
    pub num_layers: usize,
    pub hidden: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// Bytes per weight (1 for FP8, 2 for bf16).
    pub weight_bytes: f64,
    /// Bytes per KV element.
    pub kv_bytes: f64,
    /// Weights in FP8: matmuls run at the fp8 rate.
    pub fp8_compute: bool,
}

impl MockModel {
    pub fn deepseek_r1_distill_llama_70b() -> Self {
        Self {
            name: "deepseek-r1-distill-llama-70b".into(),
            num_layers: 80,
            hidden: 8192,
            num_heads: 64,
            num_kv_heads: 8,
            head_dim: 128,
            intermediate: 28672,
            vocab: 128256,
            weight_bytes: 1.0,
            kv_bytes: 1.0,
            fp8_compute: true,
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "deepseek-r1-distill-llama-70b" | "llama-70b" => {
                Some(Self::deepseek_r1_distill_llama_70b())
            }
            _ => None,
        }
    }

    /// Parameters: per layer Q and O (hidden²), K and V (hidden × kv width), the SwiGLU MLP
    /// (3 × hidden × intermediate); plus the embedding and the untied LM head.
    pub fn params(&self) -> f64 {
        let h = self.hidden as f64;
        let kv = (self.num_kv_heads * self.head_dim) as f64;
        let per_layer = 2.0 * h * h + 2.0 * h * kv + 3.0 * h * self.intermediate as f64;
        self.num_layers as f64 * per_layer + 2.0 * self.vocab as f64 * h
    }

    /// KV bytes one token occupies over every layer (K and V).
    pub fn kv_bytes_per_token(&self) -> f64 {
        2.0 * (self.num_layers * self.num_kv_heads * self.head_dim) as f64 * self.kv_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_70b_has_70_billion_parameters_and_160_kib_of_kv_per_token() {
        let m = MockModel::deepseek_r1_distill_llama_70b();
        assert!((m.params() / 1e9 - 70.55).abs() < 0.05, "{}", m.params());
        assert_eq!(m.kv_bytes_per_token(), 160.0 * 1024.0);
    }
}
