//! The LoRA-Dash form of the fused op. candle's custom ops take at most three tensors and
//! this one has four inputs with gradients (x, A, B, c), so A and B travel packed as one
//! vector `[vec(A) | vec(B)]` (r·in + out·r), concatenated by candle, whose backward splits
//! the packed gradient back onto A and B. The copy is of the LoRA factors only (tiny next to
//! any activation). `U_s` and `V_s` are frozen and held by the op, as `W` is.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};

use super::{tensor_view, view, DashTerm, DashViews, LoraLinear, Needs, Views};
use crate::error::Result;
use crate::ops::cpu::{f32_data, storage_f32, weight_view, widened_weight, CResult, MatView};

pub(super) struct LoraDashLinear {
    lora: LoraLinear,
    /// (out, s), detached
    u: Tensor,
    /// (in, s), detached
    v: Tensor,
    rank: usize,
    /// Whether A and B were tracked when the op was built: the packed gradient carries
    /// zeros for a factor that was not.
    need_a: bool,
    need_b: bool,
}

impl LoraDashLinear {
    /// The op and its packed second input `[vec(a) | vec(b)]`.
    pub(super) fn new(
        lora: LoraLinear,
        a: &Tensor,
        b: &Tensor,
        dash: DashTerm,
    ) -> Result<(Self, Tensor)> {
        let ab = Tensor::cat(&[&a.flatten_all()?, &b.flatten_all()?], 0)?; // (r·in + out·r)
        let op = LoraDashLinear {
            lora,
            u: dash.u_s.detach(),
            v: dash.v_s.detach(),
            rank: a.dim(0)?,
            need_a: a.track_op(),
            need_b: b.track_op(),
        };
        Ok((op, ab))
    }

    /// A (r, in) and B (out, r) inside the packed vector.
    fn split<'a>(&self, ab: &'a [f32], w: MatView) -> CResult<(MatView<'a>, MatView<'a>)> {
        let (out_dim, in_dim, r) = (w.rows, w.cols, self.rank);
        if ab.len() != r * (in_dim + out_dim) {
            return Err(candle_core::Error::Msg(format!(
                "lora-dash-linear: packed factors have {} values, expected {}",
                ab.len(),
                r * (in_dim + out_dim)
            ))
            .bt());
        }
        let (a, b) = ab.split_at(r * in_dim);
        Ok((MatView::rows(a, r, in_dim), MatView::rows(b, out_dim, r)))
    }
}

impl CustomOp3 for LoraDashLinear {
    fn name(&self) -> &'static str {
        "lora-dash-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = view(s1, l1, "lora-dash-linear x")?;
        let ab = f32_data(s2, l2, "lora-dash-linear ab")?;
        let c = f32_data(s3, l3, "lora-dash-linear c")?;
        let widened = widened_weight(&self.lora.w)?;
        let (ws, wl) = self.lora.w.storage_and_layout();
        let w = weight_view(&widened, &ws, wl, "lora-dash-linear w")?;
        let (us, ul) = self.u.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let dash = DashViews {
            u: tensor_view(&us, ul, "lora-dash-linear u_s")?,
            v: tensor_view(&vs, vl, "lora-dash-linear v_s")?,
            c: &c,
        };
        let (a, b) = self.split(&ab, w)?;
        let y = self.lora.forward(x, w, a, b, Some(dash));
        Ok((CpuStorage::F32(y), Shape::from((x.rows, w.rows))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ab: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_ab = ab.track_op();
        let need = Needs {
            x: x.track_op(),
            a: need_ab && self.need_a,
            b: need_ab && self.need_b,
            c: c.track_op(),
        };
        if !(need.x || need_ab || need.c) {
            return Ok((None, None, None));
        }
        let widened = widened_weight(&self.lora.w)?;
        let (grads, r, in_dim, out_dim) = {
            let (xs, xl) = x.storage_and_layout();
            let (abs, abl) = ab.storage_and_layout();
            let (cs, cl) = c.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (ws, wl) = self.lora.w.storage_and_layout();
            let (us, ul) = self.u.storage_and_layout();
            let (vs, vl) = self.v.storage_and_layout();
            let abd = storage_f32(&abs, abl, "lora-dash-linear ab")?;
            let cd = storage_f32(&cs, cl, "lora-dash-linear c")?;
            let w = weight_view(&widened, &ws, wl, "lora-dash-linear w")?;
            let (a, b) = self.split(&abd, w)?;
            let v = Views {
                x: tensor_view(&xs, xl, "lora-dash-linear x")?,
                a,
                b,
                dy: tensor_view(&gs, gl, "lora-dash-linear dy")?,
                w,
                dash: Some(DashViews {
                    u: tensor_view(&us, ul, "lora-dash-linear u_s")?,
                    v: tensor_view(&vs, vl, "lora-dash-linear v_s")?,
                    c: &cd,
                }),
            };
            (self.lora.backward(&v, need), a.rows, w.cols, w.rows)
        };
        let dev = Device::Cpu;
        let dx = grads
            .x
            .map(|g| Tensor::from_vec(g, x.shape(), &dev))
            .transpose()?;
        let dab = need_ab
            .then(|| {
                let mut packed = grads
                    .a
                    .unwrap_or_else(|| crate::ops::cpu::zeros(r * in_dim));
                packed.extend(
                    grads
                        .b
                        .unwrap_or_else(|| crate::ops::cpu::zeros(out_dim * r)),
                );
                Tensor::from_vec(packed, ab.shape(), &dev)
            })
            .transpose()?;
        let dc = grads
            .c
            .map(|g| Tensor::from_vec(g, c.shape(), &dev))
            .transpose()?;
        Ok((dx, dab, dc))
    }
}
