//! What the crate asks of the CPU and of the environment, and the state it keeps per process.
//!
//! Kernels are chosen at run time, by the features this CPU reports ([`Features::detect`]) and
//! the shapes of a product, never by the thread count. The same binary runs the AVX-512
//! register tiles, the AMX tiles, or the AVX2 and scalar paths of the same products.
//!
//! # Environment variables
//! - `NDTRANSFORMER_AMX=0` turns the AMX path off. Batch products then run on the AVX-512
//!   kernels of `gemm`. Read once per process, on the first product that could use the tiles.
//! - `RAYON_NUM_THREADS` sets the size of rayon's global pool (read by rayon, not here); a
//!   model run inside `pool.install(…)` uses that pool instead.
//!
//! # Process-wide state
//! The crate has no global setting a caller can change. What it keeps per process or per
//! thread is:
//! - the AMX decision ([`amx_granted`]): a `OnceLock<bool>` holding `NDTRANSFORMER_AMX` and
//!   the Linux kernel's answer to the request for the tile state
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`). That permission is itself process-wide: once
//!   granted, every thread of the process may use the tiles.
//! - `WARM_PASSES` (`ops/pool.rs`), a per-thread count of the warm passes the thread is
//!   running. It tells a waiting thread not to poll on behalf of a pass while it runs one.
//! - `ROWS` and `SCRATCH` (`ops/amx.rs`), per-thread buffers for the bfloat16 parts of the
//!   AMX products. They are kept from one product to the next so that they are not fresh pages
//!   each time. Every product overwrites what it reads, so no value passes through them from
//!   one call to another.
//! - whether the int8 products may use the AMX tiles (`ops/int8_amx.rs`), a `OnceLock<bool>`
//!   asked once, since `cpuid` traps to the hypervisor in a virtual machine.
//! - `UNIT` (`ops/int8.rs`), a per-thread buffer for the sums of one unit of an int8 product
//!   before they are dequantized, overwritten by each unit before it is read.
//! - `SCRATCH` (`ops/bf16.rs`), a per-thread buffer for the f32 widening of the bf16 weight
//!   panel a batch product works on, kept for the same reason and overwritten by each product
//!   before it is read.
//!
//! None of these changes a result, except that the AMX path sums in another order than the
//! AVX-512 kernels (within f32 rounding, `docs/gemm_backends.md`).

use std::fmt;
use std::sync::OnceLock;

/// The instruction-set extensions the kernels can use, as this CPU (and its operating system)
/// reports them.
///
/// ```
/// let features = ndtransformer::cpu::Features::detect();
/// println!("{features}"); // for example "AVX2 FMA AVX-512 VNNI BF16"
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX2 and FMA: the baseline of the vectorised kernels.
    pub avx2_fma: bool,
    /// AVX-512 F, BW, CD, DQ and VL (with AVX2, FMA, BMI and LZCNT: `pulp`'s `V4`): the
    /// register-tile kernels.
    pub avx512: bool,
    /// AVX-512 VNNI (`vpdpbusd`): int8 dot products in AVX-512 registers.
    pub avx512_vnni: bool,
    /// AVX-512 BF16 (`vdpbf16ps`): bfloat16 dot products.
    pub avx512_bf16: bool,
    /// AVX-VNNI: int8 dot products in AVX2 registers.
    pub avx_vnni: bool,
    /// AMX-TILE with AMX-BF16: the tile registers and their bfloat16 products.
    pub amx_bf16: bool,
    /// AMX-INT8: int8 products on the tiles.
    pub amx_int8: bool,
}

impl Features {
    /// The features of the CPU the process runs on (each asked once by `std`, then cached).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let (amx_bf16, amx_int8) = amx_cpuid();
            Features {
                avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                avx512: pulp::x86::V4::try_new().is_some(),
                avx512_vnni: is_x86_feature_detected!("avx512vnni"),
                avx512_bf16: is_x86_feature_detected!("avx512bf16"),
                avx_vnni: is_x86_feature_detected!("avxvnni"),
                amx_bf16,
                amx_int8,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Features::default()
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (self.avx2_fma, "AVX2 FMA"),
            (self.avx512, "AVX-512"),
            (self.avx512_vnni, "VNNI"),
            (self.avx512_bf16, "BF16"),
            (self.avx_vnni, "AVX-VNNI"),
            (self.amx_bf16, "AMX-BF16"),
            (self.amx_int8, "AMX-INT8"),
        ];
        let present: Vec<&str> = names
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
        if present.is_empty() {
            f.write_str("no AVX2")
        } else {
            f.write_str(&present.join(" "))
        }
    }
}

/// The CPU's model name as the operating system reports it (`/proc/cpuinfo` on Linux), or
/// `None` where it cannot be read.
pub fn model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

/// Whether the CPU has AMX-TILE with AMX-BF16, and AMX-INT8 (CPUID leaf 7: EDX bits 24, 22
/// and 25). The operating system must still grant the tile state ([`amx_granted`]).
#[cfg(target_arch = "x86_64")]
fn amx_cpuid() -> (bool, bool) {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86-64 CPU.
    let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
    let tile = edx & (1 << 24) != 0;
    (tile && edx & (1 << 22) != 0, tile && edx & (1 << 25) != 0)
}

/// Whether this process may use the AMX tiles: the CPU has them, `NDTRANSFORMER_AMX` is not
/// `0`, and the kernel grants the tile state. Asked once per process, then cached.
pub fn amx_granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        std::env::var_os("NDTRANSFORMER_AMX").is_none_or(|v| v != "0")
            && Features::detect().amx_bf16
            && request_tiles()
    })
}

/// Asks Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`); `false` elsewhere.
fn request_tiles() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: this request only asks the kernel for permission to use the tile state; it
        // reads and writes no memory of the process.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_agree_with_what_the_kernels_detect() {
        let features = Features::detect();
        #[cfg(target_arch = "x86_64")]
        assert_eq!(features.avx512, pulp::x86::V4::try_new().is_some());
        if features.avx512 || features.avx_vnni {
            assert!(features.avx2_fma, "AVX-512 and AVX-VNNI CPUs have AVX2");
        }
        if !features.amx_bf16 {
            assert!(!amx_granted(), "no AMX without the CPU's tiles");
        }
        let shown = features.to_string();
        assert_eq!(shown.contains("AVX-512"), features.avx512, "{shown}");
        assert_eq!(shown.contains("AMX-BF16"), features.amx_bf16, "{shown}");
    }
}
