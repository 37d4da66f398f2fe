//! The activations and `exp`: ReLU, exact GELU, GELU's tanh form and SiLU as the linear
//! layers' epilogues, and the vectorised `eˣ` the softmax kernels use.
//!
//! The feed-forward layer (§3.3) gets its activation through [`super::Epilogue`], applied by
//! [`super::linear`] right after the product.

use super::lanes::with_slice;
use super::norm::add_row;
use super::Epilogue;
use multiversion::multiversion;
use ndarray::parallel::prelude::*;
use ndarray::{ArrayView1, ArrayViewMut2, Axis};

/// The epilogue's activation on every row of `y`, which already holds `x · wᵀ + b`; rows in
/// parallel.
pub(super) fn activate_rows(mut y: ArrayViewMut2<f32>, epilogue: Epilogue) {
    y.axis_iter_mut(Axis(0))
        .into_par_iter()
        .with_min_len(16)
        .for_each(|row| with_slice(row, |row| activate(row, epilogue)));
}

/// `row = epilogue(row + bias)`: the bias added to the product's sum, then the activation.
pub(super) fn add_bias_activate(row: &mut [f32], bias: ArrayView1<f32>, epilogue: Epilogue) {
    add_row(row, bias);
    activate(row, epilogue);
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(super) fn activate(row: &mut [f32], epilogue: Epilogue) {
    match epilogue {
        Epilogue::Bias => {}
        Epilogue::BiasRelu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
        Epilogue::BiasGelu => row.iter_mut().for_each(|v| *v = gelu(*v)),
        Epilogue::BiasGeluTanh => row.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
        Epilogue::BiasSilu => row.iter_mut().for_each(|v| *v = silu(*v)),
    }
}

/// `eˣ` for `x ≤ 0` in a form the compiler vectorises, to within 2 ulp of `f32::exp`;
/// `-inf` (a masked score) gives exactly 0.
///
/// Cody–Waite reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, then a degree-7 Taylor polynomial for
/// `eʳ` (truncation error below 1e-9) and `2ⁿ` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// `a · b + c`, fused into one rounding when `FUSED` (for callers compiled with FMA, where it is
/// one instruction instead of two; elsewhere it is a slow library call).
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`], with fused multiply-adds when `FUSED`.
#[inline(always)]
pub(super) fn exp_with<const FUSED: bool>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below this eˣ is under f32's smallest normal; the softmax treats it as 0.
    const MIN: f32 = -87.0;
    const TAYLOR: [f32; 8] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let clamped = x.clamp(MIN, 88.0);
    // Adding 1.5·2²³ rounds x·log₂e to the nearest integer n and leaves n in the low mantissa
    // bits; subtracting it again gives n as a float. Plain vector arithmetic, where `round`
    // and a float-to-int cast would not vectorise.
    const ROUND: f32 = 12_582_912.0;
    let shifted = madd::<FUSED>(clamped, std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = madd::<FUSED>(-n, LN2_LO, madd::<FUSED>(-n, LN2_HI, clamped));
    let p = TAYLOR[..7]
        .iter()
        .rev()
        .fold(TAYLOR[7], |acc, &c| madd::<FUSED>(acc, r, c));
    // 2ⁿ: n + 127 in the exponent field.
    let scale = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            << 23,
    );
    if x < MIN {
        0.0
    } else {
        p * scale
    }
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))` (PyTorch's `approximate="none"`), in f32 arithmetic the
/// compiler vectorises, with fused multiply-adds: call it from code compiled for FMA.
///
/// erf comes from Abramowitz & Stegun 7.1.26, `1 − t·P(t)·e^(−z²)` with `t = 1/(1 + p|z|)`
/// (absolute error ≤ 1.5e-7), the formula of PyTorch's own vectorised CPU kernel; the result is
/// within 5e-7 of the correctly rounded GELU for |x| ≤ 10 (tested). A libm `erf` in f64 cost
/// 15–30 ns an element, most of a BERT-style encoder's time.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / madd::<true>(P, a, 1.0);
    let poly = A[..4]
        .iter()
        .rev()
        .fold(A[4], |acc, &c| madd::<true>(acc, t, c))
        * t;
    let erf = madd::<true>(-poly, exp_with::<true>(-(a * a)), 1.0).copysign(z);
    0.5 * x * (1.0 + erf)
}

/// `e^(−|x|)` and `1/(1 + e^(−|x|))`, the pieces of a logistic function that never overflow.
#[inline(always)]
fn logistic_parts(x: f32) -> (f32, f32) {
    let e = exp_with::<true>(-x.abs());
    (e, 1.0 / (1.0 + e))
}

/// SiLU (swish), `x·σ(x) = x / (1 + e^(−x))`, as PyTorch's `nn.SiLU` and Marian's `swish`;
/// within 2 ulp-scale error of the f64 formula (tested). Call it from code compiled for FMA.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    // σ(x) = 1/(1 + e^(−x)) for x ≥ 0, e^x/(1 + e^x) below: e^(−|x|) ≤ 1 either way.
    let (e, r) = logistic_parts(x);
    let sigma = if x >= 0.0 { r } else { e * r };
    x * sigma
}

/// GELU's tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`: PyTorch's
/// `approximate="tanh"` and Hugging Face's `gelu_new`. `tanh(u) = 2σ(2u) − 1`, computed from
/// `e^(−2|u|)` so that it neither overflows nor cancels. Call it from code compiled for FMA.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * madd::<true>(0.044_715 * x * x, x, x);
    let (e, r) = logistic_parts(2.0 * u);
    // tanh(|u|) = (1 − e)/(1 + e) with e = e^(−2|u|).
    let tanh = ((1.0 - e) * r).copysign(u);
    0.5 * x * (1.0 + tanh)
}

#[cfg(test)]
mod tests {
    use super::super::{linear, Weight};
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::array;

    #[test]
    fn gelu_is_within_5e7_of_the_f64_formula() {
        let mut worst = 0f64;
        let mut x = -10.0f32;
        while x <= 10.0 {
            let x64 = x as f64;
            let exact = 0.5 * x64 * (1.0 + libm::erf(x64 * std::f64::consts::FRAC_1_SQRT_2));
            worst = worst.max((gelu(x) as f64 - exact).abs());
            x += 1.0 / 1024.0;
        }
        assert!(worst < 5e-7, "worst abs error {worst:e}");
        // Large inputs saturate cleanly.
        assert_eq!(gelu(-100.0), 0.0);
        assert_eq!(gelu(100.0), 100.0);
    }

    /// Worst absolute error of `f` against `exact` on [-20, 20], relative for |y| > 1.
    fn worst_error(f: fn(f32) -> f32, exact: fn(f64) -> f64) -> f64 {
        let mut worst = 0f64;
        let mut x = -20.0f32;
        while x <= 20.0 {
            let want = exact(x as f64);
            worst = worst.max((f(x) as f64 - want).abs() / want.abs().max(1.0));
            x += 1.0 / 512.0;
        }
        worst
    }

    #[test]
    fn silu_and_gelu_tanh_are_within_4e7_of_the_f64_formulas() {
        let silu_exact = |x: f64| x / (1.0 + (-x).exp());
        let gelu_tanh_exact = |x: f64| {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        };
        let silu_err = worst_error(silu, silu_exact);
        let tanh_err = worst_error(gelu_tanh, gelu_tanh_exact);
        assert!(silu_err < 4e-7, "silu worst error {silu_err:e}");
        assert!(tanh_err < 4e-7, "gelu_tanh worst error {tanh_err:e}");
        assert_eq!((silu(0.0), gelu_tanh(0.0)), (0.0, 0.0));
        assert_eq!((silu(-200.0), silu(200.0)), (0.0, 200.0));
        assert_eq!((gelu_tanh(-200.0), gelu_tanh(200.0)), (0.0, 200.0));
        // Known values (PyTorch: F.silu(1.) = 0.7310586, F.gelu(1., approximate="tanh") =
        // 0.8411920).
        assert_abs_diff_eq!(silu(1.0), 0.731_058_6, epsilon = 1e-7);
        assert_abs_diff_eq!(gelu_tanh(1.0), 0.841_192, epsilon = 1e-7);
    }

    #[test]
    fn gelu_matches_known_values() {
        let x = array![-1.0f32, 0.0, 1.0, 3.0].mapv(gelu);
        assert_abs_diff_eq!(
            x,
            array![-0.158_655_26f32, 0.0, 0.841_344_7, 2.995_950_3],
            epsilon = 1e-6
        );
        // The epilogues add the bias before activating.
        let x = array![[1.0f32, -2.0]];
        let w = array![[1.0f32, 0.0], [0.0, 1.0]];
        let b = array![0.5f32, 1.0];
        let w = Weight::Plain(w.view());
        let y = linear(x.view(), w, Some(b.view()), Epilogue::BiasRelu);
        assert_eq!(y, array![[1.5f32, 0.0]]);
        let y = linear(x.view(), w, Some(b.view()), Epilogue::BiasGelu);
        assert_abs_diff_eq!(y, array![[gelu(1.5), gelu(-1.0)]], epsilon = 0.0);
        let y = linear(x.view(), w, None, Epilogue::BiasRelu);
        assert_eq!(y, array![[1.0f32, 0.0]]);
    }

    #[test]
    fn exp_is_within_two_ulp_of_std_and_zero_for_masked() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.5 * f32::EPSILON, "max relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }
}
