//! The backward of the fused LoRA (and LoRA-Dash) linear op; the formulas are in the parent
//! module's header.

use rayon::prelude::*;

use super::{
    col_block, concat_cols, dropped_block, row_block, Grads, LoraLinear, Needs, Views, CHUNK_ROWS,
};
use crate::ops::cpu::{matmul_into, MatView};

impl LoraLinear {
    pub(super) fn backward(&self, v: &Views, need: Needs) -> Grads {
        let (n, in_dim, r) = (v.x.rows, v.x.cols, v.a.rows);
        let mask = &self.mask;
        let dash = v.dash;
        let need_c = need.c && dash.is_some();
        let s = dash.map_or(0, |d| d.c.len());
        let k = r + s;
        // gh = dy · [s·B | U_s] (n, r+s): g = s·dy·B reaches drop(x)·Aᵀ, h = dy·U_s
        // reaches x·V_s·diag(c).
        let mut gh = crate::ops::cpu::zeros(n * k);
        if need.x || need.a || need_c {
            match dash {
                None => matmul_into(&mut gh, v.dy, v.b, self.scale, false, true),
                Some(d) => {
                    let right = concat_cols(v.b, self.scale, d.u, None); // (out, r+s)
                    let right = MatView::rows(&right, v.b.rows, k);
                    matmul_into(&mut gh, v.dy, right, 1.0, false, true);
                }
            }
        }
        let mut dx = need.x.then(|| {
            let mut dx = crate::ops::cpu::zeros(n * in_dim);
            matmul_into(&mut dx, v.dy, v.w, 1.0, false, true); // dy · W
            dx
        });
        // The forward's [drop(x)·Aᵀ | x·V_s], when kept; else both are recomputed per chunk.
        let thin = if need.b || need_c {
            self.take_thin(n, k)
        } else {
            None
        };
        let mut xa = (need.b && thin.is_none()).then(|| crate::ops::cpu::zeros(n * r));
        let thin_c = need_c && thin.is_some();

        // One pass over row chunks regenerates each chunk of drop(x) once for dA and
        // drop(x)·Aᵀ, applies the mask to the LoRA part of dx, and recomputes the chunk's
        // x·V_s for dc while the rows are in cache.
        let chunks = n.div_ceil(CHUNK_ROWS);
        let mut dx_parts: Vec<Option<&mut [f32]>> = match dx.as_mut() {
            Some(d) if in_dim > 0 => d.chunks_mut(CHUNK_ROWS * in_dim).map(Some).collect(),
            _ => (0..chunks).map(|_| None).collect(),
        };
        let mut xa_parts: Vec<Option<&mut [f32]>> = match xa.as_mut() {
            Some(d) if r > 0 => d.chunks_mut(CHUNK_ROWS * r).map(Some).collect(),
            _ => (0..chunks).map(|_| None).collect(),
        };
        dx_parts.resize_with(chunks, || None);
        xa_parts.resize_with(chunks, || None);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx_parts
            .into_par_iter()
            .zip(xa_parts.into_par_iter())
            .enumerate()
            .map(|(c, (dx_c, xa_c))| {
                let r0 = c * CHUNK_ROWS;
                let len = CHUNK_ROWS.min(n - r0);
                let g_c = col_block(&gh, k, r0, len, 0, r);
                let h_c = col_block(&gh, k, r0, len, r, s);
                let mut buf = Vec::new();
                let mut da = Vec::new();
                if need.a || need.b {
                    let d = dropped_block(v.x, mask, r0, len, &mut buf);
                    if let Some(xa_c) = xa_c {
                        matmul_into(xa_c, d, v.a.t(), 1.0, false, false);
                    }
                    if need.a {
                        da = crate::ops::cpu::zeros(r * in_dim);
                        matmul_into(&mut da, g_c.t(), d, 1.0, false, false);
                    }
                }
                let mut dc = Vec::new();
                if let (Some(d), true, false) = (dash, need_c, thin_c) {
                    let mut xv = crate::ops::cpu::zeros(len * s);
                    matmul_into(&mut xv, row_block(v.x, r0, len), d.v, 1.0, false, false);
                    dc = crate::ops::cpu::zeros(s);
                    for (i, xv_i) in xv.chunks_exact(s).enumerate() {
                        let h_i = &h_c.data[i * k..i * k + s];
                        dc.iter_mut()
                            .zip(xv_i.iter().zip(h_i))
                            .for_each(|(dc, (&p, &q))| *dc += p * q);
                    }
                }
                if let Some(dx_c) = dx_c {
                    if mask.active() {
                        let mut t = crate::ops::cpu::zeros(len * in_dim);
                        matmul_into(&mut t, g_c, v.a, 1.0, false, false); // g·A
                        for i in 0..len {
                            let rows = i * in_dim..(i + 1) * in_dim;
                            mask.add_masked_row(r0 + i, &t[rows.clone()], &mut dx_c[rows]);
                        }
                    } else {
                        matmul_into(dx_c, g_c, v.a, 1.0, true, false);
                    }
                    if let Some(d) = dash {
                        let mut hc = crate::ops::cpu::zeros(len * s); // (len, s) = h·diag(c)
                        for (i, row) in hc.chunks_exact_mut(s).enumerate() {
                            let h_i = &h_c.data[i * k..i * k + s];
                            for ((o, &h), &c) in row.iter_mut().zip(h_i).zip(d.c) {
                                *o = h * c;
                            }
                        }
                        matmul_into(dx_c, MatView::rows(&hc, len, s), d.v.t(), 1.0, true, false);
                    }
                }
                (da, dc)
            })
            .collect();
        let a = need.a.then(|| {
            let mut da = crate::ops::cpu::zeros(r * in_dim);
            for (p, _) in partials.iter().filter(|p| !p.0.is_empty()) {
                da.iter_mut().zip(p).for_each(|(d, &p)| *d += p);
            }
            da
        });
        let c = need_c.then(|| {
            let mut dc = vec![0f64; s];
            match &thin {
                // dc = Σ_rows (x·V_s) ⊙ h, rows in the same chunks as the recomputing path.
                Some(t) => {
                    for (t_i, gh_i) in t.chunks_exact(k).zip(gh.chunks_exact(k)) {
                        dc.iter_mut()
                            .zip(t_i[r..].iter().zip(&gh_i[r..]))
                            .for_each(|(d, (&p, &q))| *d += (p * q) as f64);
                    }
                }
                None => {
                    for (_, p) in partials.iter().filter(|p| !p.1.is_empty()) {
                        dc.iter_mut().zip(p).for_each(|(d, &p)| *d += p as f64);
                    }
                }
            }
            dc.into_iter().map(|d| d as f32).collect()
        });
        // dB = s · dyᵀ · (drop(x)·Aᵀ)  (out, r)
        let xa = match (&thin, &xa) {
            (Some(t), _) => Some(col_block(t, k, 0, n, 0, r)),
            (None, Some(xa)) => Some(MatView::rows(xa, n, r)),
            (None, None) => None,
        };
        let b = xa.filter(|_| need.b).map(|xa| {
            let mut db = crate::ops::cpu::zeros(v.b.rows * r);
            matmul_into(&mut db, v.dy.t(), xa, self.scale, false, true);
            db
        });
        Grads { x: dx, a, b, c }
    }
}
