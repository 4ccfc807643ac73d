//! Linear-layer products through an optimized BLAS: Intel MKL loaded at run time, or the
//! system OpenBLAS linked with the `openblas` feature.
//!
//! candle's CPU matmul (the `gemm` crate without its nightly AVX-512 kernels) reached 68
//! GFLOP/s on a 2048³ f32 product on our 2-core AVX-512 machine, where PyTorch's BLAS (MKL)
//! reaches 200; the frozen linears of a LoRA step (forward and input gradient) are most of its
//! FLOPs, so those products (and the fused head's) go through a BLAS when one is available:
//!
//! * **MKL** when `LLMTUNE_MKL` names `libmkl_rt.so.*` (or a folder holding it, e.g. the `lib`
//!   folder of `pip install mkl`; `scripts/setup_mkl.sh` fetches it from PyPI). Nothing is
//!   linked at build time: the library is opened with `dlopen` on first use, so every build
//!   can use it. Besides `cblas_sgemm` it brings `cblas_gemm_bf16bf16f32` (AMX / AVX-512 BF16
//!   kernels: bf16 inputs, f32 accumulation and output), which the bf16 compute path uses.
//!   Threads: GNU OpenMP (libgomp)
//!   when it loads, else sequential; `MKL_THREADING_LAYER` / `MKL_NUM_THREADS` override.
//! * **OpenBLAS** (feature `openblas`, Debian `libopenblas-dev`) otherwise; its kernels are
//!   picked for the CPU at run time (see the CLI's `OPENBLAS_CORETYPE` fix).
//! * Neither: `None` from every function here, and the caller takes candle's matmul.
//!
//! Only 2-D operands (or batches of them) whose layout is row-major or transposed with unit
//! stride go here; anything else returns `None`.

use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::bf16;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type SgemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type GemmBf16Fn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const u16,
    c_int,
    *const u16,
    c_int,
    f32,
    *mut f32,
    c_int,
);
/// MKL's entry points, resolved once.
struct Mkl {
    sgemm: SgemmFn,
    gemm_bf16: GemmBf16Fn,
    about: String,
    // Keeps the library mapped for the life of the process.
    _lib: libloading::Library,
}

#[cfg(feature = "openblas")]
#[link(name = "openblas")]
extern "C" {
    fn openblas_get_corename() -> *const c_char;
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
#[cfg(feature = "openblas")]
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

static MKL: OnceLock<Result<Option<Mkl>, String>> = OnceLock::new();

/// The library files `LLMTUNE_MKL` may point at (a file, or a folder holding one).
fn mkl_candidates(spec: &str) -> Vec<std::path::PathBuf> {
    let p = std::path::Path::new(spec);
    if !p.is_dir() {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::new();
    for dir in [p.to_path_buf(), p.join("lib")] {
        for name in ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"] {
            let f = dir.join(name);
            if f.is_file() {
                out.push(f);
            }
        }
    }
    if out.is_empty() {
        out.push(p.join("libmkl_rt.so"));
    }
    out
}

fn load_mkl(spec: &str) -> Result<Mkl, String> {
    let mut errors = Vec::new();
    for path in mkl_candidates(spec) {
        // SAFETY: loading MKL runs its (well-behaved) initialisers only.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => return resolve_mkl(lib, &path),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    Err(format!(
        "LLMTUNE_MKL={spec}: cannot load MKL ({}); point it at libmkl_rt.so.* or its folder \
         (scripts/setup_mkl.sh fetches it from PyPI), or unset it",
        errors.join("; ")
    ))
}

fn resolve_mkl(lib: libloading::Library, path: &std::path::Path) -> Result<Mkl, String> {
    let missing = |e: libloading::Error| format!("{}: not an MKL library ({e})", path.display());
    // SAFETY: the symbols are MKL's documented C entry points with these signatures.
    unsafe {
        let sgemm = *lib.get::<SgemmFn>(b"cblas_sgemm\0").map_err(missing)?;
        let gemm_bf16 = *lib
            .get::<GemmBf16Fn>(b"cblas_gemm_bf16bf16f32\0")
            .map_err(missing)?;
        let set_layer = *lib
            .get::<unsafe extern "C" fn(c_int) -> c_int>(b"MKL_Set_Threading_Layer\0")
            .map_err(missing)?;
        let set_threads = *lib
            .get::<unsafe extern "C" fn(c_int)>(b"MKL_Set_Num_Threads\0")
            .map_err(missing)?;
        let max_threads = *lib
            .get::<unsafe extern "C" fn() -> c_int>(b"MKL_Get_Max_Threads\0")
            .map_err(missing)?;
        let version = *lib
            .get::<unsafe extern "C" fn(*mut c_char, c_int)>(b"MKL_Get_Version_String\0")
            .map_err(missing)?;
        // Threading layer: GNU OpenMP when libgomp is there (MKL_THREADING_GNU = 3), else
        // sequential (1); the user's MKL_THREADING_LAYER wins.
        let layer = if std::env::var_os("MKL_THREADING_LAYER").is_some() {
            None
        } else if libloading::Library::new("libgomp.so.1").is_ok() {
            Some(3)
        } else {
            Some(1)
        };
        if let Some(l) = layer {
            // OpenMP workers that spin between products steal the cores from candle's pool
            // and our kernels (24.6 s against 15.8 s for a training step on 2 busy cores):
            // let them sleep, unless the user says otherwise. libgomp reads this when MKL
            // loads it, on the first product.
            if l == 3 && std::env::var_os("OMP_WAIT_POLICY").is_none() {
                std::env::set_var("OMP_WAIT_POLICY", "PASSIVE");
            }
            set_layer(l);
        }
        if std::env::var_os("MKL_NUM_THREADS").is_none() {
            let n = std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            set_threads(n.min(c_int::MAX as usize) as c_int);
        }
        let mut buf = vec![0 as c_char; 256];
        version(buf.as_mut_ptr(), buf.len() as c_int);
        let v = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        let layer_name = match layer {
            Some(3) => "GNU OpenMP",
            Some(_) => "sequential",
            None => "MKL_THREADING_LAYER",
        };
        let about = format!(
            "MKL ({}) from {}, {} threads ({layer_name})",
            v.trim(),
            path.display(),
            max_threads()
        );
        // One 1x1x1 product now: MKL opens its interface, threading and kernel libraries on the
        // first call (and ends the process when one is missing), so that happens at start,
        // with MKL's message naming the file, not in the middle of a run.
        let (a, b, mut c) = (1f32, 1f32, 0f32);
        sgemm(
            ROW_MAJOR, NO_TRANS, NO_TRANS, 1, 1, 1, 1.0, &a, 1, &b, 1, 0.0, &mut c, 1,
        );
        if c != 1.0 {
            return Err(format!("{}: a 1x1 product gave {c}, not 1", path.display()));
        }
        Ok(Mkl {
            sgemm,
            gemm_bf16,
            about,
            _lib: lib,
        })
    }
}

fn mkl_state() -> &'static Result<Option<Mkl>, String> {
    MKL.get_or_init(|| match std::env::var("LLMTUNE_MKL") {
        Ok(s) if !s.trim().is_empty() => load_mkl(s.trim()).map(Some),
        _ => Ok(None),
    })
}

fn mkl() -> Option<&'static Mkl> {
    mkl_state().as_ref().ok().and_then(|m| m.as_ref())
}

/// Loads the BLAS named by the environment (`LLMTUNE_MKL`) and says which products will use
/// what. An error when `LLMTUNE_MKL` is set but does not load (the CLI reports it at start
/// rather than silently running on the slow path).
pub fn init() -> Result<String, String> {
    match mkl_state() {
        Err(e) => Err(e.clone()),
        Ok(Some(m)) => Ok(m.about.clone()),
        Ok(None) => Ok(if cfg!(feature = "openblas") {
            "OpenBLAS (linked)".to_string()
        } else {
            "candle gemm (no BLAS: set LLMTUNE_MKL or build with --features openblas)".to_string()
        }),
    }
}

/// Whether bf16 x bf16 -> f32 products have a fast kernel (MKL loaded).
pub fn has_bf16_gemm() -> bool {
    mkl().is_some()
}

/// `(offset, trans, ld)` of a `[r, c]` operand for a row-major product, or `None` when
/// neither dimension has unit stride.
fn operand(l: &Layout) -> Option<(usize, c_int, usize)> {
    let (r, c) = l.shape().dims2().ok()?;
    let st = l.stride();
    operand_strides(r, c, st[0], st[1], l.start_offset())
}

fn operand_strides(
    r: usize,
    c: usize,
    s0: usize,
    s1: usize,
    off: usize,
) -> Option<(usize, c_int, usize)> {
    if (s1 == 1 || c == 1) && (r == 1 || s0 >= c) {
        Some((off, NO_TRANS, if r == 1 { c.max(1) } else { s0 }))
    } else if (s0 == 1 || r == 1) && (c == 1 || s1 >= r) {
        Some((off, TRANS, if c == 1 { r.max(1) } else { s1 }))
    } else {
        None
    }
}

/// The checked shape of `a [m, k] @ b [k, n]`: `(m, n, k, (ao, at, lda), (bo, bt, ldb))`, or
/// `None` when a layout does not fit, a size exceeds `c_int` or an operand would be read past
/// its buffer.
#[allow(clippy::type_complexity)]
fn plan(
    alen: usize,
    al: &Layout,
    blen: usize,
    bl: &Layout,
) -> Option<(
    usize,
    usize,
    usize,
    (usize, c_int, usize),
    (usize, c_int, usize),
)> {
    let (m, k) = al.shape().dims2().ok()?;
    let (k2, n) = bl.shape().dims2().ok()?;
    if k != k2 {
        return None;
    }
    let a = operand(al)?;
    let b = operand(bl)?;
    let fits = |v: usize| c_int::try_from(v).is_ok();
    if ![m, n, k, a.2, b.2].into_iter().all(fits) {
        return None;
    }
    // The last element each operand reaches must be inside its buffer.
    let extent = |(off, t, ld): (usize, c_int, usize), r: usize, c: usize| {
        let (rows, cols) = if t == NO_TRANS { (r, c) } else { (c, r) };
        off + rows.saturating_sub(1) * ld + cols
    };
    if m > 0 && n > 0 && k > 0 && (extent(a, m, k) > alen || extent(b, k, n) > blen) {
        return None;
    }
    Some((m, n, k, a, b))
}

/// A result buffer that a product with `beta = 0` fills: BLAS writes every element of C
/// without reading it, so zeroing it first (a memset of every output, 5% of a training step)
/// is skipped. `f` gets the buffer's pointer and must write all `len` elements.
fn filled_by(len: usize, f: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    f(v.as_mut_ptr() as *mut f32);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `f` initialised all `len` elements; MaybeUninit<f32> has f32's layout, and the
    // allocation is handed over unchanged (same capacity and allocator).
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, len, v.capacity()) }
}

/// Whether an f32 BLAS is available (MKL loaded or OpenBLAS linked).
pub fn has_sgemm() -> bool {
    cfg!(feature = "openblas") || mkl().is_some()
}

/// `c = a @ b` for one f32 product whose operands were checked by the caller.
///
/// # Safety
/// `a`/`b` must hold every element the `(offset, trans, ld)` descriptions reach for an
/// `[m, k]` / `[k, n]` operand, `c` must hold `m * n` elements, every size must fit a c_int,
/// and a BLAS must be available ([`has_sgemm`]). C is written, never read (`beta = 0`).
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (ao, at, lda): (usize, c_int, usize),
    b: &[f32],
    (bo, bt, ldb): (usize, c_int, usize),
    c: *mut f32,
) {
    let (ap, bp) = (a.as_ptr().add(ao), b.as_ptr().add(bo));
    let (mi, ni, ki) = (m as c_int, n as c_int, k as c_int);
    let (la, lb) = (lda as c_int, ldb as c_int);
    if let Some(f) = sgemm_fn() {
        f(
            ROW_MAJOR, at, bt, mi, ni, ki, 1.0, ap, la, bp, lb, 0.0, c, ni,
        );
    }
}

/// The f32 product of the loaded MKL, else of the linked OpenBLAS; `None` without either.
fn sgemm_fn() -> Option<SgemmFn> {
    if let Some(m) = mkl() {
        return Some(m.sgemm);
    }
    #[cfg(feature = "openblas")]
    return Some(cblas_sgemm as SgemmFn);
    #[allow(unreachable_code)]
    None
}

/// `a [m, k] @ b [k, n]` (f32) into a new row-major `[m, n]` buffer, or `None` when no BLAS is
/// available or the layouts do not fit (see [`plan`]).
pub(crate) fn sgemm(a: &[f32], al: &Layout, b: &[f32], bl: &Layout) -> Option<Vec<f32>> {
    if !has_sgemm() {
        return None;
    }
    let (m, n, k, ad, bd) = plan(a.len(), al, b.len(), bl)?;
    if m == 0 || n == 0 || k == 0 {
        return Some(vec![0f32; m * n]);
    }
    // SAFETY: `plan` checked the extents and sizes; the product writes all m * n elements.
    Some(filled_by(m * n, |c| unsafe {
        sgemm_raw((m, n, k), a, ad, b, bd, c)
    }))
}

/// Batched `a [.., m, k] @ b [.., k, n]` (f32, same leading dims, any strides whose last two
/// dims fit [`operand`]) into a new contiguous `[.., m, n]` buffer: one BLAS product per
/// batch entry. `None` when no BLAS is available or a layout does not fit.
pub(crate) fn sgemm_batched(a: &[f32], al: &Layout, b: &[f32], bl: &Layout) -> Option<Vec<f32>> {
    if !has_sgemm() {
        return None;
    }
    let (ad, bd) = (al.dims(), bl.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        return None;
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let batch: usize = ad[..r - 2].iter().product();
    let (sa, sb) = (al.stride(), bl.stride());
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        return Some(vec![0f32; batch * m * n]);
    }
    let fits = |v: usize| c_int::try_from(v).is_ok();
    let mut idx = vec![0usize; r - 2];
    // Every batch entry's operands are checked before any product runs, so that the
    // buffer is either filled completely or not used at all.
    let mut plans = Vec::with_capacity(batch);
    for i in 0..batch {
        // Offsets of this batch entry (row-major over the leading dims).
        let mut rem = i;
        for d in (0..r - 2).rev() {
            idx[d] = rem % ad[d];
            rem /= ad[d];
        }
        let off = |start: usize, st: &[usize]| {
            start + idx.iter().zip(st).map(|(i, s)| i * s).sum::<usize>()
        };
        let ao = operand_strides(m, k, sa[r - 2], sa[r - 1], off(al.start_offset(), sa))?;
        let bo = operand_strides(k, n, sb[r - 2], sb[r - 1], off(bl.start_offset(), sb))?;
        if ![m, n, k, ao.2, bo.2].into_iter().all(fits) {
            return None;
        }
        let extent = |(o, t, ld): (usize, c_int, usize), rr: usize, cc: usize| {
            let (rows, cols) = if t == NO_TRANS { (rr, cc) } else { (cc, rr) };
            o + rows.saturating_sub(1) * ld + cols
        };
        if extent(ao, m, k) > a.len() || extent(bo, k, n) > b.len() {
            return None;
        }
        plans.push((ao, bo));
    }
    Some(filled_by(batch * m * n, |c| {
        for (i, &(ao, bo)) in plans.iter().enumerate() {
            // SAFETY: extents and sizes checked above; entry i writes its m * n elements
            // at i * m * n, inside the batch * m * n buffer.
            unsafe { sgemm_raw((m, n, k), a, ao, b, bo, c.add(i * m * n)) };
        }
    }))
}

/// One operand of [`gemm_f32`]: a row-major matrix stored in `data` from `off` with leading
/// dimension `ld`, used as it is or transposed (`trans`).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub ld: usize,
    pub trans: bool,
}

impl<'a> Mat<'a> {
    pub(crate) fn new(data: &'a [f32], off: usize, ld: usize, trans: bool) -> Self {
        Self {
            data,
            off,
            ld,
            trans,
        }
    }

    /// Whether the `[r, c]` operand (after `trans`) lies inside `data` with a valid `ld`.
    fn fits(&self, r: usize, c: usize) -> bool {
        let (sr, sc) = if self.trans { (c, r) } else { (r, c) };
        sr == 0
            || sc == 0
            || (self.ld >= sc && self.off + (sr - 1) * self.ld + sc <= self.data.len())
    }
}

/// `c[m, n] = alpha * a[m, k] @ b[k, n] + beta * c` (f32, row-major; `c` starts at `c_off`
/// with leading dimension `ldc`), through MKL or OpenBLAS when available, else the `gemm`
/// crate (candle's own CPU product). With `beta = 0`, `c` is written without being read.
/// Errors (never reads or writes out of bounds) when an operand does not fit its buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    c: &mut [f32],
    c_off: usize,
    ldc: usize,
) -> candle_core::Result<()> {
    let c_fits = m == 0 || n == 0 || (ldc >= n && c_off + (m - 1) * ldc + n <= c.len());
    if !a.fits(m, k) || !b.fits(k, n) || !c_fits {
        candle_core::bail!("gemm: operands do not fit their buffers ({m}x{k} @ {k}x{n})")
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let cp = c[c_off..].as_mut_ptr();
    let (ap, bp) = (a.data[a.off..].as_ptr(), b.data[b.off..].as_ptr());
    let fits = |v: usize| c_int::try_from(v).is_ok();
    let blas = sgemm_fn().filter(|_| [m, n, k, a.ld, b.ld, ldc].into_iter().all(fits));
    if let Some(f) = blas {
        let t = |tr: bool| if tr { TRANS } else { NO_TRANS };
        let (mi, ni, ki) = (m as c_int, n as c_int, k as c_int);
        let (la, lb, lc) = (
            a.ld.max(1) as c_int,
            b.ld.max(1) as c_int,
            ldc.max(1) as c_int,
        );
        // SAFETY: the extents were checked above; sizes fit c_int.
        unsafe {
            f(
                ROW_MAJOR,
                t(a.trans),
                t(b.trans),
                mi,
                ni,
                ki,
                alpha,
                ap,
                la,
                bp,
                lb,
                beta,
                cp,
                lc,
            )
        };
        return Ok(());
    }
    // (row stride, column stride) of an operand as read.
    let strides = |x: &Mat| {
        if x.trans {
            (1isize, x.ld as isize)
        } else {
            (x.ld as isize, 1isize)
        }
    };
    let ((ars, acs), (brs, bcs)) = (strides(&a), strides(&b));
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the extents were checked above. The gemm crate computes
    // dst = alpha * dst + beta * lhs @ rhs (its alpha/beta are BLAS's beta/alpha).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            cp,
            1,
            ldc as isize,
            beta != 0.0,
            ap,
            acs,
            ars,
            bp,
            bcs,
            brs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `a [m, k] @ b [k, n]` with bf16 inputs, f32 accumulation and an f32 `[m, n]` result (MKL
/// only: `None` without it or when the layouts do not fit).
pub(crate) fn gemm_bf16(a: &[bf16], al: &Layout, b: &[bf16], bl: &Layout) -> Option<Vec<f32>> {
    let mkl = mkl()?;
    let (m, n, k, (ao, at, lda), (bo, bt, ldb)) = plan(a.len(), al, b.len(), bl)?;
    if m == 0 || n == 0 || k == 0 {
        return Some(vec![0f32; m * n]);
    }
    // SAFETY: as in `sgemm`; bf16 is a 16-bit plain value, as MKL's MKL_BF16 (uint16); the
    // product writes all m * n elements (beta = 0).
    Some(filled_by(m * n, |c| unsafe {
        (mkl.gemm_bf16)(
            ROW_MAJOR,
            at,
            bt,
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            a.as_ptr().add(ao) as *const u16,
            lda as c_int,
            b.as_ptr().add(bo) as *const u16,
            ldb as c_int,
            0.0,
            c,
            n as c_int,
        );
    }))
}

/// `a @ b` for 2-D CPU tensors through a BLAS, with no autograd graph (for use inside
/// backward passes and on detached values); `None` when it does not apply.
///
/// * f32 @ f32: `sgemm`, f32 result.
/// * any mix with a bf16 operand (f32 or bf16 with bf16) when MKL is loaded: the f32 operand is
///   rounded to bf16, the product accumulates in f32; the result is f32 when either input was
///   f32, bf16 when both were.
pub(crate) fn matmul_no_graph(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    if !a.device().is_cpu() || !b.device().is_cpu() || a.rank() != 2 || b.rank() != 2 {
        return None;
    }
    let (m, n) = (a.dim(0).ok()?, b.dim(1).ok()?);
    let (da, db) = (a.dtype(), b.dtype());
    if da == DType::F32 && db == DType::F32 {
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
        return Tensor::from_vec(out, (m, n), a.device()).ok();
    }
    let bf = |d: DType| d == DType::BF16 || d == DType::F32;
    if !(bf(da) && bf(db) && has_bf16_gemm()) {
        return None;
    }
    let out = {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        match (&*sa, &*sb) {
            (Storage::Cpu(sa), Storage::Cpu(sb)) => gemm_mixed_bf16(sa, la, sb, lb)?,
            _ => return None,
        }
    };
    let t = Tensor::from_vec(out, (m, n), a.device()).ok()?;
    if da == DType::BF16 && db == DType::BF16 {
        t.to_dtype(DType::BF16).ok()
    } else {
        Some(t)
    }
}

/// `a [m, k] @ b [k, n]` for f32 or bf16 CPU operands through MKL's bf16 product: f32
/// operands are rounded to bf16 first; the `[m, n]` result is f32. `None` without MKL.
pub(crate) fn gemm_mixed_bf16(
    a: &CpuStorage,
    al: &Layout,
    b: &CpuStorage,
    bl: &Layout,
) -> Option<Vec<f32>> {
    if !has_bf16_gemm() {
        return None;
    }
    let (av, la) = bf16_view(a, al)?;
    let (bv, lb) = bf16_view(b, bl)?;
    gemm_bf16(av.slice(a)?, &la, bv.slice(b)?, &lb)
}

/// The bf16 values of an operand: its own storage when it is bf16, else a converted copy.
enum Bf16View {
    Same,
    Owned(Vec<bf16>),
}

impl Bf16View {
    fn slice<'s>(&'s self, s: &'s CpuStorage) -> Option<&'s [bf16]> {
        match (self, s) {
            (Bf16View::Owned(v), _) => Some(v),
            (Bf16View::Same, CpuStorage::BF16(v)) => Some(v),
            _ => None,
        }
    }
}

/// A bf16 view of an f32 or bf16 2-D CPU operand: bf16 storage as it is; f32 rounded into a
/// contiguous copy of the layout's elements (with the layout rewritten to match).
fn bf16_view(s: &CpuStorage, l: &Layout) -> Option<(Bf16View, Layout)> {
    match s {
        CpuStorage::BF16(_) => Some((Bf16View::Same, l.clone())),
        CpuStorage::F32(v) => {
            let (r, c) = l.shape().dims2().ok()?;
            let out = match l.contiguous_offsets() {
                Some((s0, s1)) => {
                    // SAFETY: to_bf16 writes every element (s1 - s0 == r * c).
                    let mut out = unsafe { crate::cpu::write_only::<bf16>(r * c) };
                    to_bf16(&v[s0..s1], &mut out);
                    out
                }
                None => {
                    let mut out = vec![bf16::ZERO; r * c];
                    let (st0, st1) = (l.stride()[0], l.stride()[1]);
                    let off = l.start_offset();
                    for i in 0..r {
                        for j in 0..c {
                            out[i * c + j] = bf16::from_f32(v[off + i * st0 + j * st1]);
                        }
                    }
                    out
                }
            };
            Some((Bf16View::Owned(out), Layout::contiguous((r, c))))
        }
        _ => None,
    }
}

crate::cpu::simd_fn! {
    /// `dst[i] = bf16(src[i])`, branch-free so that it vectorises: round to nearest even, NaN
    /// stays a (quiet) NaN; bit for bit what `half::bf16::from_f32` gives.
    fn to_bf16_run<T: Elem>(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            let b = s.to_bits();
            let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
            let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
            *d = bf16::from_bits(if nan { ((b >> 16) | 0x40) as u16 } else { rounded });
        }
    }
}

/// `dst[i] = bf16(src[i])` (round to nearest even), split over the kernels' worker pool
/// (candle's) when large.
pub(crate) fn to_bf16(src: &[f32], dst: &mut [bf16]) {
    const CHUNK: usize = 1 << 14;
    let n = src.len().min(dst.len());
    let main = n / CHUNK * CHUNK;
    crate::cpu::for_each_row(&mut dst[..main], CHUNK, |i, d| {
        to_bf16_run::<f32>(&src[i * CHUNK..(i + 1) * CHUNK], d)
    });
    to_bf16_run::<f32>(&src[main..n], &mut dst[main..n]);
}

#[cfg(test)]
mod tests {
    /// The branch-free conversion equals `half`'s on ties, NaN, infinities, subnormals and
    /// a sweep of bit patterns, through the chunked (parallel) path and its tail.
    #[test]
    fn to_bf16_is_bit_identical_to_half() {
        let mut src: Vec<f32> = [
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3F80_8000), // tie, even below: stays
            f32::from_bits(0x3F81_8000), // tie, odd below: rounds up
            f32::from_bits(0x3F80_8001),
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7F80_0001), // signalling NaN
            f32::from_bits(0xFFC1_2345),
        ]
        .to_vec();
        let mut s = 0x1234_5678u32;
        while src.len() < 3 * (1 << 14) + 123 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            src.push(f32::from_bits(s));
        }
        let mut dst = vec![half::bf16::ZERO; src.len()];
        super::to_bf16(&src, &mut dst);
        for (i, (&x, &y)) in src.iter().zip(&dst).enumerate() {
            assert_eq!(
                y.to_bits(),
                half::bf16::from_f32(x).to_bits(),
                "element {i}: {x:e}"
            );
        }
    }

    use candle_core::{DType, Device, IndexOp, Tensor};

    /// Every layout pairing (row-major, transposed, offset/narrowed rows) against candle's
    /// own matmul, through whichever BLAS this process has (none: every call declines).
    #[test]
    fn sgemm_matches_candle_for_each_layout() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (7, 12), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (12, 5), &dev)?;
        let have_blas = cfg!(feature = "openblas") || super::mkl().is_some();
        if !have_blas {
            assert!(super::matmul_no_graph(&a, &b).is_none());
            eprintln!("skipped: no BLAS in this process (set LLMTUNE_MKL or --features openblas)");
            return Ok(());
        }
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

    /// The bf16 product (MKL only) equals an f64 product of the bf16-rounded inputs up to f32
    /// accumulation, for f32 x bf16, bf16 x bf16 and transposed operands.
    #[test]
    fn bf16_gemm_matches_rounded_f64_product() -> candle_core::Result<()> {
        if !super::has_bf16_gemm() {
            eprintln!("skipped: the bf16 product needs MKL (set LLMTUNE_MKL)");
            return Ok(());
        }
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (33, 70), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (19, 70), &dev)?.to_dtype(DType::BF16)?;
        let want = a
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F64)?
            .matmul(&w.to_dtype(DType::F64)?.t()?)?;
        for (x, dtype) in [
            (a.clone(), DType::F32),
            (a.to_dtype(DType::BF16)?, DType::BF16),
        ] {
            let got = super::matmul_no_graph(&x, &w.t()?).expect("bf16 product");
            assert_eq!(got.dtype(), dtype);
            let got = got.to_dtype(DType::F64)?;
            let tol = if dtype == DType::F32 { 1e-4 } else { 0.1 };
            let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < tol, "{dtype:?}: max |diff| {d}");
        }
        Ok(())
    }
}
