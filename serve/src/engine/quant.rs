//! Weight-only quantization of the linear layers: int8 per output channel and int4 in groups along the input
//! dimension, with the matmul `y = x·Wᵀ` computed on the quantized storage.
//!
//! A linear weight `W` is `[out, in]` row-major (HF layout; `y[t, o] = Σ_i x[t, i]·W[o, i]`).
//!
//! **int8, symmetric, per output channel.** For each row `o`: `s_o = max_i |W[o, i]| / 127`,
//! `q[o, i] = clamp(round(W[o, i] / s_o), −127, 127)` stored as `i8`, and `W[o, i] ≈ s_o·q[o, i]`. Because
//! `|W[o, i] / s_o| ≤ 127` the clamp never bites, so the round-trip error is at most half a step:
//! `|W[o, i] − s_o·q[o, i]| ≤ s_o / 2` (up to f32 rounding). A row of zeros gets `s_o = 0`, `q = 0` (exact).
//! Storage: `out·in` bytes + `4·out` bytes of scales (≈ 8 bits per weight).
//!
//! **int4, asymmetric, per group of `g` inputs.** Row `o` is cut into groups `G_j = [j·g, min((j+1)·g, in))`.
//! For each group, `m = min W`, `M = max W`, `s = (M − m) / 15`, `q = clamp(round((W − m) / s), 0, 15)` and
//! `W ≈ m + s·q`. The offset `m` is a float (not an integer zero point), so `W − m ∈ [0, 15·s]` and again the
//! clamp never bites: `|W − (m + s·q)| ≤ s / 2`. Asymmetric, because a group's weights are rarely centred on
//! zero: all 16 levels cover `[m, M]`, a step `(M − m)/15` where a symmetric code would need `2·max|W|/15` or
//! worse. Two codes share a byte: in a group of length `L` taking bytes `[j·g/2, j·g/2 + ⌈L/2⌉)`, element
//! `k < ⌈L/2⌉` is the low nibble of the group's byte `k` and element `⌈L/2⌉ + k` the high nibble of byte `k`
//! (llama.cpp's block layout: unpacking is two contiguous loops); a row takes `⌈in/2⌉` bytes (an odd-length
//! last group leaves one high nibble 0). Storage:
//! `out·⌈in/2⌉` bytes + 8 bytes (`s`, `m` as f32) per group: 4.5 bits per weight at `g = 128`.
//!
//! Group size: when `in` is a multiple of 8, the requested `g` (default 128, a power of two ≥ 8) is halved
//! until it divides `in`, so every group of a matrix has the same size; otherwise no halving can make it
//! divide, `g` stays as requested and the last group of each row is shorter. Qwen3's hidden and FFN sizes are
//! all multiples of 128, so real models get `g = 128`. The tiny test models (`hidden 64`, FFN 128) get
//! `g = 64` for the projections that read the hidden state and `g = 128` for `down_proj` at the default: one
//! group per row, int4 per output channel. `int4:32` asks for 32 everywhere (2 or 4 groups per row), the
//! setting that shows what grouping buys on those models.
//!
//! What is quantized ([`Quantization::format_for`]): the seven projections of every layer (`q/k/v/o_proj`,
//! `gate/up/down_proj`, MoE experts included). The embedding, the norms and the MoE router stay f32 (the router
//! is tiny and its top-k choice is discontinuous). An untied `lm_head` is stored as int8 in both modes (the
//! logits are the most precision-sensitive product, as llama.cpp keeps its output matrix at higher precision);
//! a tied head *is* the f32 embedding and is not duplicated.
//!
//! **Kernel.** [`Int8Weight::matmul`] / [`Int4Weight::matmul`] never build the dequantized matrix. For each
//! output row they dequantize that one row into an `in`-long f32 buffer (int8: the codes `q` as f32, the scale
//! applied to the finished dot product; int4: `m + s·q` per group), then take its dot product with a tile of up
//! to [`ROW_TILE`] input rows, accumulating in f32. The whole row is dequantized once per tile, so a decode
//! step (`T = 1`) reads every code once and a prefill of `T` rows dequantizes each row `⌈T / ROW_TILE⌉` times.
//! With enough work ([`MIN_MACS_PER_THREAD`]) the output rows are split over `available_parallelism()`
//! scoped threads. The loops are plain Rust written to auto-vectorize (32 accumulator lanes); on x86-64 the
//! same code is also compiled for AVX2 + FMA and picked at run time when the CPU has them. The result equals
//! `x·dequant(W)ᵀ` up to f32 summation order.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use qkernels::ops;
use qkernels::{Device, Tensor};

/// Default int4 group size along the input dimension.
pub const DEFAULT_INT4_GROUP: usize = 128;
/// Smallest int4 group the automatic fallback goes down to.
pub const MIN_INT4_GROUP: usize = 8;
/// Input rows multiplied against one dequantized weight row before the next weight row is dequantized.
pub const ROW_TILE: usize = 32;
/// Multiply-adds a thread must have before the kernel splits output rows over threads: 16M, about a
/// millisecond of single-core work. Threads are spawned per call (scoped), which costs tens of microseconds on
/// an idle machine and up to a scheduler time slice on a busy one, so a decode step's GEMVs (`T = 1`, a few
/// million MACs for sub-10B models) stay on the engine thread and only prefill-sized products fan out.
pub const MIN_MACS_PER_THREAD: usize = 1 << 24;

/// Why quantizing or a quantized matmul failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// A `--quantization` value that is not `none`, `int8`, `int4` or `int4:G`.
    #[error(
        "unknown quantization `{0}` (expected none, int8, int4, or int4:G with G a power of two in 8..=4096)"
    )]
    Parse(String),
    /// Data of the wrong length for the stated shape, or an input of the wrong width.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: String,
        got: String,
    },
    /// A weight is NaN or infinite; no scale can represent it.
    #[error("weight `{name}` has a non-finite value in row {row}")]
    NonFinite { name: String, row: usize },
    /// The model's weights are already quantized in another format.
    #[error("the weights are already quantized as {have}; cannot quantize them as {want}")]
    AlreadyQuantized {
        have: Quantization,
        want: Quantization,
    },
    /// A parameter that must stay f32 (embedding, norm, router) was found quantized.
    #[error("an embedding, norm or router weight must be f32, found {0}")]
    NotDense(&'static str),
    /// The quantized kernels run on the host only.
    #[error("quantized weights need the CPU device, not {0}")]
    UnsupportedDevice(Device),
}

/// How the engine stores its linear weights (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// f32, as loaded.
    #[default]
    None,
    /// int8, symmetric, one scale per output channel.
    Int8,
    /// int4, asymmetric, one scale and offset per `group_size` inputs (a power of two ≥ 8).
    Int4 { group_size: usize },
}

impl Quantization {
    /// int4 with the default group of [`DEFAULT_INT4_GROUP`].
    pub const INT4: Quantization = Quantization::Int4 {
        group_size: DEFAULT_INT4_GROUP,
    };

    /// How the parameter named `name` (HF name) is stored under this mode.
    pub fn format_for(self, name: &str) -> Format {
        const LINEAR: [&str; 7] = [
            ".q_proj.weight",
            ".k_proj.weight",
            ".v_proj.weight",
            ".o_proj.weight",
            ".gate_proj.weight",
            ".up_proj.weight",
            ".down_proj.weight",
        ];
        match self {
            Quantization::None => Format::F32,
            _ if name == "lm_head.weight" => Format::Int8,
            _ if !LINEAR.iter().any(|s| name.ends_with(s)) => Format::F32,
            Quantization::Int8 => Format::Int8,
            Quantization::Int4 { group_size } => Format::Int4 { group_size },
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantization::None => f.write_str("none"),
            Quantization::Int8 => f.write_str("int8"),
            Quantization::Int4 {
                group_size: DEFAULT_INT4_GROUP,
            } => f.write_str("int4"),
            Quantization::Int4 { group_size } => write!(f, "int4:{group_size}"),
        }
    }
}

impl FromStr for Quantization {
    type Err = QuantError;

    /// `none` (also `f32`), `int8`, `int4` (group 128) or `int4:G`.
    fn from_str(s: &str) -> Result<Self, QuantError> {
        let bad = || QuantError::Parse(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "f32" => Ok(Quantization::None),
            "int8" => Ok(Quantization::Int8),
            "int4" => Ok(Quantization::INT4),
            other => {
                let g: usize = other
                    .strip_prefix("int4:")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                if !g.is_power_of_two() || !(MIN_INT4_GROUP..=4096).contains(&g) {
                    return Err(bad());
                }
                Ok(Quantization::Int4 { group_size: g })
            }
        }
    }
}

/// Storage of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    F32,
    Int8,
    Int4 { group_size: usize },
}

/// The int4 group actually used for a matrix with `in_features` inputs: `requested` rounded down to a power of
/// two (at least [`MIN_INT4_GROUP`], so groups start on byte boundaries); then, when `in_features` is a multiple
/// of [`MIN_INT4_GROUP`], halved until it divides it, otherwise kept (the last group of each row is shorter).
pub fn int4_group(in_features: usize, requested: usize) -> usize {
    let mut g = (1usize << requested.max(1).ilog2()).max(MIN_INT4_GROUP);
    if in_features.is_multiple_of(MIN_INT4_GROUP) {
        while !in_features.is_multiple_of(g) {
            g /= 2;
        }
    }
    g
}

fn check_len(what: &'static str, len: usize, out: usize, inp: usize) -> Result<(), QuantError> {
    if len != out * inp {
        return Err(QuantError::Shape {
            what,
            expected: format!("{out}×{inp} = {} values", out * inp),
            got: format!("{len}"),
        });
    }
    Ok(())
}

/// An `[out, in]` matrix as int8 codes with one f32 scale per row.
#[derive(Clone)]
pub struct Int8Weight {
    out: usize,
    inp: usize,
    /// `[out, in]` row-major.
    q: Vec<i8>,
    /// `[out]`
    scale: Vec<f32>,
}

impl fmt::Debug for Int8Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Int8Weight[{}, {}]", self.out, self.inp)
    }
}

impl Int8Weight {
    /// Quantizes row-major `w` (`[out, in]`); `name` only labels errors.
    pub fn quantize(name: &str, w: &[f32], out: usize, inp: usize) -> Result<Self, QuantError> {
        check_len("int8 weight", w.len(), out, inp)?;
        let mut q = vec![0i8; out * inp];
        let mut scale = vec![0.0f32; out];
        for o in 0..out {
            let row = &w[o * inp..(o + 1) * inp];
            if row.iter().any(|v| !v.is_finite()) {
                return Err(QuantError::NonFinite {
                    name: name.to_string(),
                    row: o,
                });
            }
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = amax / 127.0;
            scale[o] = s;
            if s > 0.0 {
                for (qi, &v) in q[o * inp..(o + 1) * inp].iter_mut().zip(row) {
                    *qi = (v / s).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Ok(Int8Weight { out, inp, q, scale })
    }

    /// `(out, in)`
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The scale `s_o` of row `o` (its quantization step).
    pub fn scale(&self, o: usize) -> f32 {
        self.scale[o]
    }

    /// Bytes held: codes plus scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
    }

    /// The f32 matrix the codes stand for (tests and references only; the forward never calls it).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.out * self.inp];
        for o in 0..self.out {
            self.dequant_row(o, &mut w[o * self.inp..(o + 1) * self.inp]);
            let s = self.scale[o];
            w[o * self.inp..(o + 1) * self.inp]
                .iter_mut()
                .for_each(|v| *v *= s);
        }
        w
    }

    /// `y = x·Wᵀ` for `x` = `[t, in]` row-major; returns `[t, out]`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Result<Vec<f32>, QuantError> {
        matmul(self, x, t)
    }
}

/// An `[out, in]` matrix as packed int4 codes with an f32 scale and offset per group of each row.
#[derive(Clone)]
pub struct Int4Weight {
    out: usize,
    inp: usize,
    group: usize,
    /// `⌈in / group⌉`
    groups: usize,
    /// `[out, ⌈in/2⌉]`: group `j` of a row starts at byte `j·group/2`; element `k` of a group of length `L`
    /// is the low nibble of the group's byte `k` for `k < ⌈L/2⌉`, else the high nibble of byte `k − ⌈L/2⌉`.
    packed: Vec<u8>,
    /// `[out, groups]`
    scale: Vec<f32>,
    /// `[out, groups]`: the group minimum `m`.
    offset: Vec<f32>,
}

impl fmt::Debug for Int4Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Int4Weight[{}, {}; group {}]",
            self.out, self.inp, self.group
        )
    }
}

impl Int4Weight {
    /// Quantizes row-major `w` (`[out, in]`) in groups of [`int4_group`]`(in, group_size)`; `name` only labels
    /// errors.
    pub fn quantize(
        name: &str,
        w: &[f32],
        out: usize,
        inp: usize,
        group_size: usize,
    ) -> Result<Self, QuantError> {
        check_len("int4 weight", w.len(), out, inp)?;
        let group = int4_group(inp, group_size);
        let groups = inp.div_ceil(group);
        let stride = inp.div_ceil(2);
        let mut packed = vec![0u8; out * stride];
        let mut scale = vec![0.0f32; out * groups];
        let mut offset = vec![0.0f32; out * groups];
        for o in 0..out {
            let row = &w[o * inp..(o + 1) * inp];
            if row.iter().any(|v| !v.is_finite()) {
                return Err(QuantError::NonFinite {
                    name: name.to_string(),
                    row: o,
                });
            }
            let prow = &mut packed[o * stride..(o + 1) * stride];
            for (j, chunk) in row.chunks(group).enumerate() {
                let lo = chunk.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s = (hi - lo) / 15.0;
                scale[o * groups + j] = s;
                offset[o * groups + j] = lo;
                if s > 0.0 {
                    let half = chunk.len().div_ceil(2);
                    let bytes = &mut prow[j * group / 2..];
                    for (k, &v) in chunk.iter().enumerate() {
                        let code = ((v - lo) / s).round().clamp(0.0, 15.0) as u8;
                        if k < half {
                            bytes[k] |= code;
                        } else {
                            bytes[k - half] |= code << 4;
                        }
                    }
                }
            }
        }
        Ok(Int4Weight {
            out,
            inp,
            group,
            groups,
            packed,
            scale,
            offset,
        })
    }

    /// `(out, in)`
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The group size in use (see [`int4_group`]).
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// The step `s` of the group holding input `i` of row `o`.
    pub fn scale(&self, o: usize, i: usize) -> f32 {
        self.scale[o * self.groups + i / self.group]
    }

    /// Bytes held: packed codes plus scales and offsets.
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scale.len() + self.offset.len())
    }

    /// The f32 matrix the codes stand for (tests and references only; the forward never calls it).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.out * self.inp];
        for o in 0..self.out {
            self.dequant_row(o, &mut w[o * self.inp..(o + 1) * self.inp]);
        }
        w
    }

    /// `y = x·Wᵀ` for `x` = `[t, in]` row-major; returns `[t, out]`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Result<Vec<f32>, QuantError> {
        matmul(self, x, t)
    }
}

/// One quantized matrix as the kernel sees it: a row at a time.
trait RowSource: Sync {
    fn dims(&self) -> (usize, usize);
    /// Writes row `o`'s values into `buf` (`in` long) and returns the factor to multiply the row's dot
    /// products by.
    fn dequant_row(&self, o: usize, buf: &mut [f32]) -> f32;
}

impl RowSource for Int8Weight {
    #[inline(always)]
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    #[inline(always)]
    fn dequant_row(&self, o: usize, buf: &mut [f32]) -> f32 {
        for (b, &q) in buf
            .iter_mut()
            .zip(&self.q[o * self.inp..(o + 1) * self.inp])
        {
            *b = f32::from(q);
        }
        self.scale[o]
    }
}

impl RowSource for Int4Weight {
    #[inline(always)]
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    #[inline(always)]
    fn dequant_row(&self, o: usize, buf: &mut [f32]) -> f32 {
        let stride = self.inp.div_ceil(2);
        let prow = &self.packed[o * stride..(o + 1) * stride];
        for (j, chunk) in buf.chunks_mut(self.group).enumerate() {
            let (s, m) = (
                self.scale[o * self.groups + j],
                self.offset[o * self.groups + j],
            );
            // `group` is even (a power of two ≥ 8), so a group starts on a byte boundary; low nibbles hold its
            // first half, high nibbles its second half, so both loops below are contiguous (vectorizable).
            let half = chunk.len().div_ceil(2);
            let bytes = &prow[j * self.group / 2..j * self.group / 2 + half];
            let (lo, hi) = chunk.split_at_mut(half);
            for (v, &b) in lo.iter_mut().zip(bytes) {
                *v = m + s * f32::from(b & 0x0f);
            }
            for (v, &b) in hi.iter_mut().zip(bytes) {
                *v = m + s * f32::from(b >> 4);
            }
        }
        1.0
    }
}

/// `Σ a_i·b_i` over 32 independent lanes (so the compiler vectorizes it and hides the add latency).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let (ac, ar) = a.as_chunks::<L>();
    let (bc, br) = b.as_chunks::<L>();
    let mut acc = [0.0f32; L];
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Output rows `o0..o0 + yt.len()/t` into `yt` (`[rows, t]`, transposed output): the same code compiled for
/// AVX2 + FMA when the CPU has them (runtime check; the build targets baseline x86-64), else as built.
fn kernel<W: RowSource>(w: &W, x: &[f32], t: usize, o0: usize, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: OnceLock<bool> = OnceLock::new();
        if *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }) {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { kernel_avx2(w, x, t, o0, yt) };
            return;
        }
    }
    kernel_body(w, x, t, o0, yt);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn kernel_avx2<W: RowSource>(w: &W, x: &[f32], t: usize, o0: usize, yt: &mut [f32]) {
    kernel_body(w, x, t, o0, yt);
}

#[inline(always)]
fn kernel_body<W: RowSource>(w: &W, x: &[f32], t: usize, o0: usize, yt: &mut [f32]) {
    let (_, inp) = w.dims();
    let rows = yt.len() / t;
    let mut buf = vec![0.0f32; inp];
    for t0 in (0..t).step_by(ROW_TILE) {
        let t1 = (t0 + ROW_TILE).min(t);
        for r in 0..rows {
            let f = w.dequant_row(o0 + r, &mut buf);
            for tt in t0..t1 {
                yt[r * t + tt] = dot(&x[tt * inp..(tt + 1) * inp], &buf) * f;
            }
        }
    }
}

fn matmul<W: RowSource>(w: &W, x: &[f32], t: usize) -> Result<Vec<f32>, QuantError> {
    let (out, inp) = w.dims();
    if x.len() != t * inp {
        return Err(QuantError::Shape {
            what: "quantized matmul input",
            expected: format!("[{t}, {inp}]"),
            got: format!("{} values", x.len()),
        });
    }
    if t == 0 || out == 0 {
        return Ok(Vec::new());
    }
    let mut yt = vec![0.0f32; out * t];
    let n = threads()
        .min(out * inp * t / MIN_MACS_PER_THREAD)
        .min(out)
        .max(1);
    if n == 1 {
        kernel(w, x, t, 0, &mut yt);
    } else {
        let per = out.div_ceil(n);
        std::thread::scope(|s| {
            for (i, part) in yt.chunks_mut(per * t).enumerate() {
                s.spawn(move || kernel(w, x, t, i * per, part));
            }
        });
    }
    if t == 1 {
        return Ok(yt);
    }
    let mut y = vec![0.0f32; t * out];
    for o in 0..out {
        for tt in 0..t {
            y[tt * out + o] = yt[o * t + tt];
        }
    }
    Ok(y)
}

/// One parameter as the inference engine holds it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense on the model's device (embedding, norms, router, and every weight without quantization): f32 on
    /// the CPU, the model's compute dtype (bf16) on CUDA.
    F32(Tensor),
    Int8(Int8Weight),
    Int4(Int4Weight),
}

impl Weight {
    /// Stores `data` (`shape`, row-major f32 on the host) as `format` says; a quantized format needs a 2-D
    /// shape and the CPU device.
    pub fn new(
        name: &str,
        data: Vec<f32>,
        shape: &[usize],
        format: Format,
        device: &Device,
    ) -> Result<Weight, super::EngineError> {
        if format == Format::F32 {
            return Ok(Weight::F32(Tensor::from_f32(data, shape, device)?));
        }
        if *device != Device::Cpu {
            return Err(QuantError::UnsupportedDevice(*device).into());
        }
        let &[out, inp] = shape else {
            return Err(QuantError::Shape {
                what: "quantized weight",
                expected: "a 2-D [out, in] matrix".into(),
                got: format!("{shape:?}"),
            }
            .into());
        };
        Ok(match format {
            Format::F32 => unreachable!("handled above"),
            Format::Int8 => Weight::Int8(Int8Weight::quantize(name, &data, out, inp)?),
            Format::Int4 { group_size } => {
                Weight::Int4(Int4Weight::quantize(name, &data, out, inp, group_size)?)
            }
        })
    }

    /// The logical shape (`[out, in]` for a quantized weight).
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::F32(t) => t.shape().to_vec(),
            Weight::Int8(q) => vec![q.shape().0, q.shape().1],
            Weight::Int4(q) => vec![q.shape().0, q.shape().1],
        }
    }

    /// The storage format.
    pub fn format(&self) -> Format {
        match self {
            Weight::F32(_) => Format::F32,
            Weight::Int8(_) => Format::Int8,
            Weight::Int4(w) => Format::Int4 {
                group_size: w.group_size(),
            },
        }
    }

    /// The f32 tensor of a parameter that is never quantized (embedding, norm, router).
    pub fn dense(&self) -> Result<&Tensor, QuantError> {
        match self {
            Weight::F32(t) => Ok(t),
            Weight::Int8(_) => Err(QuantError::NotDense("int8")),
            Weight::Int4(_) => Err(QuantError::NotDense("int4")),
        }
    }

    /// Number of values the parameter stands for.
    pub fn numel(&self) -> usize {
        match self {
            Weight::F32(t) => t.elem_count(),
            Weight::Int8(w) => w.out * w.inp,
            Weight::Int4(w) => w.out * w.inp,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(t) => t.dtype().size_in_bytes() * t.elem_count(),
            Weight::Int8(w) => w.bytes(),
            Weight::Int4(w) => w.bytes(),
        }
    }

    /// `y = x·Wᵀ` for `x` = `[T, in]`: the `qkernels` GEMM for f32, the quantized kernel otherwise.
    pub fn linear(&self, x: &Tensor) -> Result<Tensor, super::EngineError> {
        let (out, inp) = match self {
            Weight::F32(w) => return Ok(ops::linear_fwd(x, w)?),
            Weight::Int8(w) => w.shape(),
            Weight::Int4(w) => w.shape(),
        };
        let &[t, xin] = x.shape() else {
            return Err(QuantError::Shape {
                what: "quantized linear input",
                expected: format!("[T, {inp}]"),
                got: format!("{:?}", x.shape()),
            }
            .into());
        };
        if xin != inp {
            return Err(QuantError::Shape {
                what: "quantized linear input",
                expected: format!("[{t}, {inp}]"),
                got: format!("{:?}", x.shape()),
            }
            .into());
        }
        let xs = x.to_vec_f32()?;
        let y = match self {
            Weight::F32(_) => unreachable!("handled above"),
            Weight::Int8(w) => w.matmul(&xs, t)?,
            Weight::Int4(w) => w.matmul(&xs, t)?,
        };
        Ok(Tensor::from_f32(y, &[t, out], &x.device())?)
    }
}

/// Expert `e`'s linear on permuted rows `offsets[e]..offsets[e+1]` of `x`, concatenated (the quantized
/// counterpart of `ops::grouped_linear_fwd`, which it calls when every weight is f32).
pub fn grouped_linear(
    x: &Tensor,
    ws: &[&Weight],
    offsets: &[usize],
) -> Result<Tensor, super::EngineError> {
    if let Some(dense) = ws
        .iter()
        .map(|w| w.dense().ok())
        .collect::<Option<Vec<&Tensor>>>()
    {
        return Ok(ops::grouped_linear_fwd(x, &dense, offsets)?);
    }
    if offsets.len() != ws.len() + 1 || offsets.last() != x.shape().first() {
        return Err(QuantError::Shape {
            what: "grouped linear offsets",
            expected: format!("{} offsets ending at {:?}", ws.len() + 1, x.shape().first()),
            got: format!("{offsets:?}"),
        }
        .into());
    }
    let mut parts = Vec::with_capacity(ws.len());
    for (e, w) in ws.iter().enumerate() {
        let len = offsets[e + 1] - offsets[e];
        if len > 0 {
            parts.push(w.linear(&x.narrow(0, offsets[e], len)?)?);
        }
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok(Tensor::cat(&refs, 0)?)
}

/// What the weights of a model take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WeightStats {
    /// The mode the model was loaded or quantized with.
    pub quantization: Quantization,
    /// Values of all parameters (a tied head counted once).
    pub params: usize,
    /// Of which stored quantized.
    pub quantized_params: usize,
    /// Bytes held.
    pub bytes: usize,
    /// Bytes the same parameters take in f32 (`4·params`).
    pub f32_bytes: usize,
}
