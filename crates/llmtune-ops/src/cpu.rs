//! Shared helpers of the CPU kernels: element types with their accumulator type, access to
//! the rows of a strided tensor, tensor <-> slice plumbing and vectorisable inner loops.
//!
//! Every kernel in this crate works row by row over the last dim of its inputs. An input may
//! have any layout whose last dim is contiguous (stride 1): transposed or narrowed views and
//! broadcast (stride 0) leading dims are read in place, never copied. Outputs are always fresh
//! contiguous buffers.

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};
use num_traits::Float;
use rayon::prelude::*;
use std::ops::Range;

/// A floating element type that a kernel can read and write.
///
/// `Acc` is the type the kernel computes in: `f32` for `f32`/`bf16`/`f16` and `f64` for `f64`
/// (so that the f64 finite-difference checks see f64 precision).
pub(crate) trait Elem: WithDType + Copy + Send + Sync + 'static {
    type Acc: Acc;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(a: Self::Acc) -> Self;
}

impl Elem for f32 {
    type Acc = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f32) -> f32 {
        a
    }
}

impl Elem for f64 {
    type Acc = f64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f64) -> f64 {
        a
    }
}

impl Elem for bf16 {
    type Acc = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> bf16 {
        bf16::from_f32(a)
    }
}

impl Elem for f16 {
    type Acc = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> f16 {
        f16::from_f32(a)
    }
}

/// An accumulator type (`f32` or `f64`).
pub(crate) trait Acc: Float + Send + Sync + std::ops::AddAssign + 'static {
    /// `exp`, vectorisable: a polynomial for `f32` (about 1 ulp), the libm one for `f64`.
    fn exp_fast(self) -> Self;
}

impl Acc for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}

impl Acc for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// `exp(x)` for `f32` built only from operations LLVM vectorises (Cephes' polynomial after
/// the reduction `x = k ln2 + r`, `|r| <= ln2 / 2`; the scaling by `2^k` goes through the
/// exponent bits). Relative error about 1e-7; `exp(x) = 0` below `-87.3`, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    // `max`/`min` drop a NaN operand (unlike `clamp`), so `xc` is always finite
    #[allow(clippy::manual_clamp)]
    let xc = x.max(-87.3).min(88.7);
    let t = xc * LOG2E + MAGIC;
    let k = t - MAGIC;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // k + 127 lands in the exponent field; bits of `t` above it are shifted out
    let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    let e = y * scale;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// The widest SIMD level of this CPU that the kernels are compiled for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SimdLevel {
    Base,
    /// AVX2 + FMA (x86-64-v3).
    V3,
    /// AVX-512 F/BW/VL/DQ (x86-64-v4).
    V4,
}

/// Detects the SIMD level once.
pub(crate) fn simd_level() -> SimdLevel {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let cached = LEVEL.load(Ordering::Relaxed);
    let level = if cached != u8::MAX {
        cached
    } else {
        let l = detect_level();
        LEVEL.store(l, Ordering::Relaxed);
        l
    };
    match level {
        2 => SimdLevel::V4,
        1 => SimdLevel::V3,
        _ => SimdLevel::Base,
    }
}

fn detect_level() -> u8 {
    if std::env::var_os("LLMTUNE_OPS_NO_SIMD").is_some() {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let v4 = v3
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        if v4 {
            return 2;
        }
        if v3 {
            return 1;
        }
    }
    0
}

/// Defines a row kernel generic over `T: Elem` that is compiled three times (baseline,
/// AVX2+FMA, AVX-512) and dispatched at run time on [`simd_level`]. The body must only
/// call `#[inline(always)]` helpers for them to be compiled with the wider instructions.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$T:ident: Elem>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $crate::cpu::Elem>($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<$T: $crate::cpu::Elem>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4<$T: $crate::cpu::Elem>($($a: $t),*) $(-> $r)? {
                    imp::<$T>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3<$T: $crate::cpu::Elem>($($a: $t),*) $(-> $r)? {
                    imp::<$T>($($a),*)
                }
                match $crate::cpu::simd_level() {
                    // SAFETY: the CPU supports the features these variants are compiled for.
                    $crate::cpu::SimdLevel::V4 => return unsafe { v4::<$T>($($a),*) },
                    $crate::cpu::SimdLevel::V3 => return unsafe { v3::<$T>($($a),*) },
                    $crate::cpu::SimdLevel::Base => {}
                }
            }
            imp::<$T>($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// Converts an `f64` constant into an accumulator value.
#[inline(always)]
pub(crate) fn acc<A: Float>(v: f64) -> A {
    A::from(v).unwrap_or_else(A::nan)
}

/// Dispatches on the float dtype of a [`CpuStorage`], binding `$t` to the element type.
/// Non-float storages produce an error naming the op.
macro_rules! float_dispatch {
    ($storage:expr, $op:expr, |$v:ident: $t:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32($v) => {
                #[allow(dead_code)]
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64($v) => {
                #[allow(dead_code)]
                type $t = f64;
                $body
            }
            candle_core::CpuStorage::BF16($v) => {
                #[allow(dead_code)]
                type $t = half::bf16;
                $body
            }
            candle_core::CpuStorage::F16($v) => {
                #[allow(dead_code)]
                type $t = half::f16;
                $body
            }
            other => {
                use candle_core::backend::BackendStorage as _;
                candle_core::bail!("{}: unsupported dtype {:?}", $op, other.dtype())
            }
        }
    };
}
pub(crate) use float_dispatch;

/// Row access into a strided buffer whose last dim is contiguous.
#[derive(Debug, Clone)]
pub(crate) struct Rows {
    start: usize,
    /// Leading dims and strides with size-1 dims removed (row-major).
    dims: Vec<usize>,
    strides: Vec<usize>,
    /// `Some(s)` when row `r` starts at `start + r * s`.
    uniform: Option<usize>,
    n_rows: usize,
    row_len: usize,
}

impl Rows {
    /// Describes the rows (last dim) of `layout`. Errors when the last dim is not contiguous.
    pub(crate) fn new(layout: &Layout, op: &str) -> Result<Self> {
        let shape = layout.dims();
        let stride = layout.stride();
        let (row_len, last_stride) = match (shape.last(), stride.last()) {
            (Some(&d), Some(&s)) => (d, s),
            _ => (1, 1), // a scalar is one row of one element
        };
        if row_len > 1 && last_stride != 1 {
            bail!("{op}: the last dim must be contiguous (stride {last_stride})")
        }
        let lead = shape.len().saturating_sub(1);
        let mut dims = Vec::with_capacity(lead);
        let mut strides = Vec::with_capacity(lead);
        for (&d, &s) in shape[..lead].iter().zip(&stride[..lead]) {
            if d != 1 {
                dims.push(d);
                strides.push(s);
            }
        }
        let n_rows = dims.iter().product();
        // Collapsible when every stride is the next one times the next dim.
        let uniform = match strides.last() {
            None => Some(row_len),
            Some(&s_last) => {
                let mut expected = s_last;
                let mut ok = true;
                for i in (0..dims.len()).rev() {
                    if strides[i] != expected {
                        ok = false;
                        break;
                    }
                    expected *= dims[i];
                }
                ok.then_some(s_last)
            }
        };
        Ok(Self {
            start: layout.start_offset(),
            dims,
            strides,
            uniform,
            n_rows,
            row_len,
        })
    }

    /// Number of rows (product of the leading dims).
    pub(crate) fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Length of a row (the last dim).
    pub(crate) fn row_len(&self) -> usize {
        self.row_len
    }

    /// Offset of the first element of row `r` in the underlying buffer.
    #[inline]
    pub(crate) fn offset(&self, r: usize) -> usize {
        if let Some(s) = self.uniform {
            return self.start + r * s;
        }
        let mut r = r;
        let mut off = self.start;
        for i in (0..self.dims.len()).rev() {
            off += (r % self.dims[i]) * self.strides[i];
            r /= self.dims[i];
        }
        off
    }

    /// Row `r` of `data`.
    #[inline]
    pub(crate) fn row<'a, T>(&self, data: &'a [T], r: usize) -> &'a [T] {
        let o = self.offset(r);
        &data[o..o + self.row_len]
    }
}

/// Minimum number of elements a parallel task should handle (below that, threads cost more
/// than they give).
const MIN_TASK_ELEMS: usize = 16 * 1024;

/// Number of rows per parallel task for rows of `row_len` elements.
#[inline]
pub(crate) fn min_rows(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

/// Allocates a zeroed output buffer.
#[inline]
pub(crate) fn zeros<T: WithDType>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

/// A buffer of `n` values with unspecified contents, for an output that is written in full
/// before anything reads it (BLAS products with `beta = 0`, row kernels that write every
/// element of every row): no zero-fill (memset was 5% of a training step's CPU samples).
///
/// # Safety
/// The caller must write every element before reading any.
pub(crate) unsafe fn write_only<T: Copy>(n: usize) -> Vec<T> {
    let mut v: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation.
    v.set_len(n);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, length and capacity; MaybeUninit<T> has T's layout. The
    // caller's contract makes every element initialised before it is read.
    Vec::from_raw_parts(v.as_mut_ptr() as *mut T, n, v.capacity())
}

/// Whether the kernels run on rayon's global pool (`LLMTUNE_OPS_POOL=rayon`) instead of
/// candle's own CPU worker pool (the default: the pool candle's elementwise ops use, so that
/// the two never compete for the cores).
fn use_rayon() -> bool {
    static RAYON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RAYON.get_or_init(|| std::env::var("LLMTUNE_OPS_POOL").is_ok_and(|v| v == "rayon"))
}

/// Calls `f(range)` over disjoint ranges covering `0..n_rows`, in parallel when the work
/// (`n_rows * row_len` elements) is large enough.
pub(crate) fn par_ranges(n_rows: usize, row_len: usize, f: impl Fn(Range<usize>) + Sync + Send) {
    if n_rows == 0 {
        return;
    }
    let grain = min_rows(row_len);
    if n_rows <= grain {
        f(0..n_rows);
    } else if use_rayon() {
        let chunks = n_rows.div_ceil(grain);
        (0..chunks)
            .into_par_iter()
            .for_each(|c| f(c * grain..n_rows.min((c + 1) * grain)));
    } else {
        // candle's pool splits into ~8 chunks per thread; keep chunks at least `grain` rows
        let chunks = n_rows.div_ceil(grain);
        candle_core::utils::barrier_pool()
            .execute_chunked(chunks, |cr| f(cr.start * grain..n_rows.min(cr.end * grain)));
    }
}

/// A raw pointer that may cross threads: the callers hand every thread a disjoint range.
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// # Safety
    /// `range` must lie within the buffer and no other live slice may overlap it.
    #[inline]
    unsafe fn slice<'a>(&self, range: Range<usize>) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.len())
    }
}

/// Calls `f(row_index, out_row)` for every row of `out` (rows of `row_len`), in parallel.
pub(crate) fn for_each_row<T: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    let n_rows = out.len() / row_len;
    let p = SendPtr(out.as_mut_ptr());
    par_ranges(n_rows, row_len, |rows| {
        // SAFETY: the ranges of rows are disjoint and within `out`.
        let chunk = unsafe { p.slice(rows.start * row_len..rows.end * row_len) };
        for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
            f(rows.start + i, row);
        }
    });
}

/// Like [`for_each_row`] over two outputs with the same row structure.
pub(crate) fn for_each_row2<T: Send, U: Send>(
    out1: &mut [T],
    out2: &mut [U],
    row_len: usize,
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync + Send,
) {
    if row_len == 0 || out1.is_empty() {
        return;
    }
    assert_eq!(
        out1.len(),
        out2.len(),
        "for_each_row2: outputs of different sizes"
    );
    let n_rows = out1.len() / row_len;
    let (p1, p2) = (SendPtr(out1.as_mut_ptr()), SendPtr(out2.as_mut_ptr()));
    par_ranges(n_rows, row_len, |rows| {
        let span = rows.start * row_len..rows.end * row_len;
        // SAFETY: the ranges of rows are disjoint and within both outputs.
        let (c1, c2) = unsafe { (p1.slice(span.clone()), p2.slice(span)) };
        for (i, (a, b)) in c1
            .chunks_exact_mut(row_len)
            .zip(c2.chunks_exact_mut(row_len))
            .enumerate()
        {
            f(rows.start + i, a, b);
        }
    });
}

/// Like [`for_each_row`], with a scratch buffer of `scratch_len` accumulator values per
/// parallel task (reused across the task's rows).
pub(crate) fn for_each_row_scratch<T: Send, A: Acc>(
    out: &mut [T],
    row_len: usize,
    scratch_len: usize,
    f: impl Fn(usize, &mut [T], &mut [A]) + Sync + Send,
) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    let n_rows = out.len() / row_len;
    let p = SendPtr(out.as_mut_ptr());
    par_ranges(n_rows, row_len, |rows| {
        let mut scratch = vec![A::zero(); scratch_len];
        // SAFETY: the ranges of rows are disjoint and within `out`.
        let chunk = unsafe { p.slice(rows.start * row_len..rows.end * row_len) };
        for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
            f(rows.start + i, row, &mut scratch);
        }
    });
}

/// Like [`for_each_row`], where every task also accumulates into its own `[A; acc_len]`
/// buffer; returns the sum of the buffers, added in row order (deterministic).
pub(crate) fn for_each_row_sum<T: Send, A: Acc>(
    out: &mut [T],
    row_len: usize,
    acc_len: usize,
    f: impl Fn(usize, &mut [T], &mut [A]) + Sync + Send,
) -> Vec<A> {
    let mut total = vec![A::zero(); acc_len];
    if row_len == 0 || out.is_empty() {
        return total;
    }
    let n_rows = out.len() / row_len;
    let p = SendPtr(out.as_mut_ptr());
    let parts = std::sync::Mutex::new(Vec::new());
    par_ranges(n_rows, row_len, |rows| {
        let mut part = vec![A::zero(); acc_len];
        // SAFETY: the ranges of rows are disjoint and within `out`.
        let chunk = unsafe { p.slice(rows.start * row_len..rows.end * row_len) };
        for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
            f(rows.start + i, row, &mut part);
        }
        parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((rows.start, part));
    });
    let mut parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
    parts.sort_by_key(|(start, _)| *start);
    for (_, part) in parts {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    total
}

/// Maps every row index (of rows of `row_len` elements, which sets the grain) to a value,
/// in parallel; returns the values in row order.
pub(crate) fn map_rows<R: Send + Copy + Default>(
    n_rows: usize,
    row_len: usize,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    let mut out = vec![R::default(); n_rows];
    let p = SendPtr(out.as_mut_ptr());
    par_ranges(n_rows, row_len, |rows| {
        // SAFETY: the ranges of rows are disjoint and within `out`.
        let chunk = unsafe { p.slice(rows.clone()) };
        for (o, r) in chunk.iter_mut().zip(rows) {
            *o = f(r);
        }
    });
    out
}

/// Borrows the CPU slice of a float tensor together with its layout and calls `f`.
pub(crate) fn with_cpu<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(s, layout),
        _ => bail!("{op}: expected a CPU tensor"),
    }
}

/// The f32 values of a contiguous CPU operand from its start offset, or an error naming the op
/// and the operand (the fused ops read their operands as plain slices).
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => Ok(&v[l.start_offset()..]),
        _ => bail!("{op}: {what} must be a contiguous f32 CPU tensor"),
    }
}

/// Returns `t` itself when its last dim is contiguous (what [`Rows`] needs), else a
/// contiguous copy.
pub(crate) fn last_dim_contiguous(t: &Tensor) -> Result<Tensor> {
    match (t.dims().last(), t.stride().last()) {
        (Some(&d), Some(&s)) if d > 1 && s != 1 => t.contiguous(),
        _ => Ok(t.clone()),
    }
}

/// Wraps a computed buffer as a tensor of `shape` on the CPU (no copy).
pub(crate) fn tensor_from_vec<T: WithDType>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Number of independent partial sums in the reductions: enough for LLVM to map each
/// reduction onto full vectors (16 f32 lanes = one AVX-512 or two AVX2 registers).
const LANES: usize = 16;

/// Sum of `f(a[i], b[i], c[i])` over equally long slices, with [`LANES`] partial sums so
/// that the loop vectorises.
#[inline(always)]
pub(crate) fn sum_map3<X: Copy, Y: Copy, Z: Copy, A: Acc>(
    a: &[X],
    b: &[Y],
    c: &[Z],
    f: impl Fn(X, Y, Z) -> A,
) -> A {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut part = [A::zero(); LANES];
    let full = n - n % LANES;
    for j in (0..full).step_by(LANES) {
        let (xa, xb, xc) = (&a[j..j + LANES], &b[j..j + LANES], &c[j..j + LANES]);
        for i in 0..LANES {
            part[i] += f(xa[i], xb[i], xc[i]);
        }
    }
    let mut s = A::zero();
    for j in full..n {
        s += f(a[j], b[j], c[j]);
    }
    tree_sum(part) + s
}

/// Sum of `f(a[i], b[i])`, vectorised like [`sum_map3`].
#[inline(always)]
pub(crate) fn sum_map2<X: Copy, Y: Copy, A: Acc>(a: &[X], b: &[Y], f: impl Fn(X, Y) -> A) -> A {
    sum_map3(a, b, a, |x, y, _| f(x, y))
}

/// Sum of `f(a[i])`, vectorised like [`sum_map3`].
#[inline(always)]
pub(crate) fn sum_map<X: Copy, A: Acc>(a: &[X], f: impl Fn(X) -> A) -> A {
    sum_map2(a, a, |x, _| f(x))
}

/// Sum of `a[i] * b[i]` in the accumulator type.
#[inline(always)]
pub(crate) fn dot<T: Elem, U: Elem<Acc = T::Acc>>(a: &[T], b: &[U]) -> T::Acc {
    sum_map2(a, b, |x, y| x.to_acc() * y.to_acc())
}

/// Sum of squares of `a`.
#[inline(always)]
pub(crate) fn sum_sq<T: Elem>(a: &[T]) -> T::Acc {
    sum_map(a, |x: T| {
        let v = x.to_acc();
        v * v
    })
}

/// Maximum of `f(a[i])` (`-inf` for an empty slice; NaNs are skipped).
#[inline(always)]
pub(crate) fn max_map<X: Copy, A: Acc>(a: &[X], f: impl Fn(X) -> A) -> A {
    let mut part = [A::neg_infinity(); LANES];
    let mut ca = a.chunks_exact(LANES);
    for xa in &mut ca {
        for i in 0..LANES {
            let v = f(xa[i]);
            // written so that it maps onto a vector max instruction
            part[i] = if v > part[i] { v } else { part[i] };
        }
    }
    let mut m = A::neg_infinity();
    for &p in part.iter() {
        m = if p > m { p } else { m };
    }
    for &x in ca.remainder() {
        let v = f(x);
        m = if v > m { v } else { m };
    }
    m
}

/// Maximum of a row in the accumulator type (`-inf` for an empty row).
#[inline(always)]
pub(crate) fn max_acc<T: Elem>(a: &[T]) -> T::Acc {
    max_map(a, |x: T| x.to_acc())
}

#[inline(always)]
fn tree_sum<A: Acc, const L: usize>(mut part: [A; L]) -> A {
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            part[i] += part[i + w];
        }
    }
    part[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn rows_of_a_transposed_view() -> Result<()> {
        let t = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 4))?;
        // [3, 2, 4] view: rows are not uniformly spaced
        let v = t.transpose(0, 1)?;
        let rows = Rows::new(v.layout(), "test")?;
        assert_eq!(rows.n_rows(), 6);
        let offs: Vec<usize> = (0..6).map(|r| rows.offset(r)).collect();
        assert_eq!(offs, vec![0, 12, 4, 16, 8, 20]);
        let c = Rows::new(t.layout(), "test")?;
        assert_eq!(
            (0..6).map(|r| c.offset(r)).collect::<Vec<_>>(),
            vec![0, 4, 8, 12, 16, 20]
        );
        // broadcast leading dim
        let b = Tensor::arange(0f32, 4., &Device::Cpu)?
            .reshape((1, 4))?
            .broadcast_as((3, 4))?;
        let br = Rows::new(b.layout(), "test")?;
        assert_eq!(
            (0..3).map(|r| br.offset(r)).collect::<Vec<_>>(),
            vec![0, 0, 0]
        );
        // a transposed last dim is rejected
        assert!(Rows::new(t.t()?.layout(), "test").is_err());
        Ok(())
    }

    #[test]
    fn reductions() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 5) as f32).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
        assert_eq!(max_acc(&a), 15.0);
        assert_eq!(max_acc::<f32>(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
