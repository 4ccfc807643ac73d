//! f32 matrix products through the system OpenBLAS (feature `openblas`).
//!
//! candle's CPU matmul (the `gemm` crate without its nightly AVX-512 kernels) reached 68
//! GFLOP/s on a 2048³ f32 product on our 2-core AVX-512 machine, where PyTorch's BLAS reaches
//! 200; the frozen linears of a LoRA step (forward and input gradient) are most of its FLOPs.
//! With this feature those products (and the fused head's) call `cblas_sgemm` of the
//! OpenBLAS the binary links (Debian: `libopenblas-dev`), whose kernels are picked for the
//! CPU at run time. Threads: OpenBLAS's own pool (`OPENBLAS_NUM_THREADS`, default all cores).
//!
//! Only 2-D f32 operands whose layout is row-major or transposed with unit stride go here;
//! anything else returns `None` and the caller takes candle's matmul.

use std::os::raw::c_int;

use candle_core::{CpuStorage, Layout, Storage, Tensor};

#[link(name = "openblas")]
extern "C" {
    fn openblas_get_corename() -> *const std::os::raw::c_char;
    #[allow(clippy::too_many_arguments)]
    fn cblas_sgemm(
        layout: c_int,
        transa: c_int,
        transb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
}

/// The kernel family OpenBLAS picked for this CPU (e.g. `SkylakeX`, `Haswell`, `Prescott`).
pub fn core_name() -> String {
    // SAFETY: OpenBLAS returns a static NUL-terminated string.
    unsafe {
        let p = openblas_get_corename();
        if p.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// `(offset, trans, ld)` of a `[r, c]` operand for a row-major `cblas_sgemm`, or `None` when
/// neither dimension has unit stride.
fn operand(l: &Layout) -> Option<(usize, c_int, usize)> {
    let (r, c) = l.shape().dims2().ok()?;
    let st = l.stride();
    let (s0, s1) = (st[0], st[1]);
    if (s1 == 1 || c == 1) && (r == 1 || s0 >= c) {
        Some((
            l.start_offset(),
            NO_TRANS,
            if r == 1 { c.max(1) } else { s0 },
        ))
    } else if (s0 == 1 || r == 1) && (c == 1 || s1 >= r) {
        Some((l.start_offset(), TRANS, if c == 1 { r.max(1) } else { s1 }))
    } else {
        None
    }
}

/// `a [m, k] @ b [k, n]` into a new row-major `[m, n]` buffer, or `None` when a layout does
/// not fit (see [`operand`]) or a size exceeds `c_int`.
pub(crate) fn sgemm(a: &[f32], al: &Layout, b: &[f32], bl: &Layout) -> Option<Vec<f32>> {
    let (m, k) = al.shape().dims2().ok()?;
    let (k2, n) = bl.shape().dims2().ok()?;
    if k != k2 {
        return None;
    }
    let (ao, at, lda) = operand(al)?;
    let (bo, bt, ldb) = operand(bl)?;
    let fits = |v: usize| c_int::try_from(v).is_ok();
    if ![m, n, k, lda, ldb].into_iter().all(fits) {
        return None;
    }
    // The last element each operand reaches must be inside its buffer.
    let extent = |off: usize, t: c_int, ld: usize, r: usize, c: usize| {
        let (rows, cols) = if t == NO_TRANS { (r, c) } else { (c, r) };
        off + rows.saturating_sub(1) * ld + cols
    };
    if m == 0 || n == 0 {
        return Some(vec![0.0; m * n]);
    }
    if k == 0 || extent(ao, at, lda, m, k) > a.len() || extent(bo, bt, ldb, k, n) > b.len() {
        return (k == 0).then(|| vec![0.0; m * n]);
    }
    let mut c = vec![0f32; m * n];
    // SAFETY: the extents of `a` and `b` were checked against their buffers above, `c` has
    // m * n elements with ldc = n, and every size fits a c_int.
    unsafe {
        cblas_sgemm(
            ROW_MAJOR,
            at,
            bt,
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            a.as_ptr().add(ao),
            lda as c_int,
            b.as_ptr().add(bo),
            ldb as c_int,
            0.0,
            c.as_mut_ptr(),
            n as c_int,
        );
    }
    Some(c)
}

/// `a @ b` for 2-D f32 CPU tensors through [`sgemm`], with no autograd graph (for use inside
/// backward passes and on detached values); `None` when it does not apply.
pub(crate) fn matmul_no_graph(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    if !a.device().is_cpu() || a.rank() != 2 || b.rank() != 2 {
        return None;
    }
    let (m, n) = (a.dim(0).ok()?, b.dim(1).ok()?);
    let out = {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        match (&*sa, &*sb) {
            (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) => {
                sgemm(av, la, bv, lb)?
            }
            _ => return None,
        }
    };
    Tensor::from_vec(out, (m, n), a.device()).ok()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp, Tensor};

    /// Every layout pairing (row-major, transposed, offset/narrowed rows) against candle's
    /// own matmul.
    #[test]
    fn sgemm_matches_candle_for_each_layout() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (7, 12), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (12, 5), &dev)?;
        let at = a.t()?.contiguous()?.t()?; // same values, column-major
        let bt = b.t()?.contiguous()?.t()?;
        let wide = Tensor::randn(0f32, 1.0, (9, 15), &dev)?;
        let a_view = wide.i((1..8, 2..14))?; // offset + row stride 15
        for (x, y) in [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt), (&a_view, &b)] {
            let want = x.contiguous()?.matmul(&y.contiguous()?)?;
            let got = super::matmul_no_graph(x, y).expect("layout supported");
            let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "max |diff| {d}");
        }
        // an operand with no unit stride ([5, 14] with strides (2, 10)) is declined
        let every_other = Tensor::randn(0f32, 1.0, (14, 10), &dev)?
            .reshape((14, 5, 2))?
            .i((.., .., 0))?
            .t()?;
        let rhs = Tensor::randn(0f32, 1.0, (14, 3), &dev)?;
        assert!(super::matmul_no_graph(&every_other, &rhs).is_none());
        assert!(super::matmul_no_graph(&every_other.contiguous()?, &rhs).is_some());
        Ok(())
    }
}
