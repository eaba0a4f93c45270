//! Which instruction set the CPU kernels run on, detected once per process.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512-BF16 plus AMX bf16 tiles (granted to the process): matmuls of several rows run
    /// on tiles ([`super::amx`]), everything else as [`Isa::Avx512Bf16`].
    Amx,
    /// AVX-512 with BF16 dot products (`vdpbf16ps`): bf16 weights multiply natively.
    Avx512Bf16,
    /// AVX-512F: bf16 weights are widened to f32 in registers.
    Avx512,
    Avx2,
    /// Whatever the compile target guarantees (SSE2 on x86-64, NEON on aarch64).
    Generic,
}

impl Isa {
    /// The best variant this CPU runs, or the one `BATON_CPU_ISA` names if the CPU runs it (to
    /// measure or test a lower one).
    pub fn detect() -> Isa {
        let best = Self::best();
        std::env::var("BATON_CPU_ISA")
            .ok()
            .and_then(|name| Self::below(best).into_iter().find(|i| i.name() == name))
            .unwrap_or(best)
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("fma");
            if avx512 && std::is_x86_feature_detected!("avx512bf16") {
                if super::amx::available() {
                    return Isa::Amx;
                }
                return Isa::Avx512Bf16;
            }
            if avx512 {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    }

    /// Whether the CPU has AMX tiles for bf16 (`amx_bf16`), which libtorch's oneDNN GEMMs and
    /// flash attention use for bf16 on CPU (why bf16 prompt attention is not upcast there).
    pub fn amx_bf16() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID.(EAX=7, ECX=0):EDX bit 22; std's detection of it is not stable.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            leaf7.edx & (1 << 22) != 0
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Every variant this CPU can run, best first (the contract tests run each).
    pub fn available() -> Vec<Isa> {
        Self::below(Self::best())
    }

    /// [`Isa::available`], after printing which variants `test` runs here and which it cannot
    /// on this CPU, so a pass on a machine without AVX-512 or AMX says what it did not cover.
    pub fn available_for(test: &str) -> Vec<Isa> {
        let here = Self::available();
        let names = |isas: &[Isa]| isas.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ");
        let missing: Vec<Isa> = Self::below(Isa::Amx)
            .into_iter()
            .filter(|i| !here.contains(i))
            .collect();
        eprintln!(
            "{test}: ran on [{}]; not on this CPU: [{}]",
            names(&here),
            names(&missing)
        );
        here
    }

    fn below(best: Isa) -> Vec<Isa> {
        let all = [
            Isa::Amx,
            Isa::Avx512Bf16,
            Isa::Avx512,
            Isa::Avx2,
            Isa::Generic,
        ];
        let at = all.iter().position(|&i| i == best).unwrap_or(all.len() - 1);
        all[at..].to_vec()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512Bf16 => "avx512-bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Generic => "generic",
        }
    }
}
