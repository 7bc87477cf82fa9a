//! LoRA-Dash inside the training loop: SVDs start in the background with the run; at the
//! end of optimizer step t each adapted layer's LoRA update selects its top-s directions
//! and the layer switches to the dash form with fresh coefficients.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adapters::{Adapter, DashLayer};
use crate::error::{Error, Result};
use crate::io::atomic;
use crate::io::weights::save_tensors;
use crate::models::Model;
use crate::train::config::DashConfig;
use crate::tsd::select::{change_rates, percentile, top_s};
use crate::tsd::svd::{SvdCache, SvdPrefetch};

pub const TSD_FILE: &str = "tsd.json";
pub const DELTA_FILE: &str = "tsd_delta.safetensors";

/// One layer's selection, as written to `tsd.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerSelection {
    pub indices: Vec<usize>,
    pub sigma: Vec<f32>,
    pub delta: Vec<f32>,
    pub percentile: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TsdReport {
    pub t: usize,
    pub s: usize,
    /// Seconds the training loop waited for SVDs at the switch.
    pub stall_s: f64,
    /// Seconds of the whole switch (wait + selection + rebuild).
    pub switch_s: f64,
    pub layers: BTreeMap<String, LayerSelection>,
}

/// What the checkpoint keeps of the method between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DashState {
    pub switched: bool,
    pub indices: BTreeMap<String, Vec<usize>>,
}

pub struct DashRuntime {
    pub cfg: DashConfig,
    prefetch: SvdPrefetch,
    pub state: DashState,
}

/// True for the optimizer name of a layer's dash coefficients c (`<path>.dash_c`), the
/// parameters `--dash-lr-scale` applies to.
pub fn is_dash_coefficient(name: &str) -> bool {
    name.ends_with(".dash_c")
}

/// Refuses an `s` larger than min(out, in) of any adapted layer, naming it.
pub fn check_s(model: &dyn Model, s: usize) -> Result<()> {
    for l in model.linears() {
        if l.adapter.is_some() {
            let k = l.in_dim().min(l.out_dim());
            if s > k {
                return Err(Error::config(
                    "dash_s",
                    format!("{s} exceeds min(out, in) = {k} of `{}`", l.path),
                ));
            }
        }
    }
    Ok(())
}

impl DashRuntime {
    /// Checks `s` against every adapted layer and starts the background SVDs.
    pub fn start(model: &dyn Model, cfg: DashConfig, cache: SvdCache) -> Result<Self> {
        let mut jobs = Vec::new();
        for l in model.linears() {
            if l.adapter.is_some() {
                let k = l.in_dim().min(l.out_dim());
                if cfg.s > k {
                    return Err(Error::config(
                        "dash_s",
                        format!("{} exceeds min(out, in) = {k} of `{}`", cfg.s, l.path),
                    ));
                }
                jobs.push((l.path.clone(), l.weight.clone()));
            }
        }
        Ok(DashRuntime {
            cfg,
            prefetch: SvdPrefetch::start(jobs, cache),
            state: DashState::default(),
        })
    }

    /// Selects the directions from the current LoRA factors and switches every adapted
    /// layer to Dash. Returns the new trainable tensors and the report.
    pub fn switch(
        &mut self,
        model: &mut dyn Model,
    ) -> Result<(Vec<(String, Var)>, TsdReport, BTreeMap<String, Vec<f32>>)> {
        let start = Instant::now();
        let mut stall = 0f64;
        let mut layers = BTreeMap::new();
        let mut full_delta = BTreeMap::new();
        let mut new_vars = Vec::new();
        for l in model.linears_mut() {
            let Some(Adapter::Lora(lora)) = l.adapter.take() else {
                continue;
            };
            let w0 = Instant::now();
            let svd = self.prefetch.wait(&l.path)?;
            stall += w0.elapsed().as_secs_f64();
            let delta = change_rates(
                &svd.u,
                &svd.sigma,
                &svd.v,
                lora.a.as_tensor(),
                lora.b.as_tensor(),
                lora.scale,
            )?;
            let idx = top_s(&delta, &svd.sigma, self.cfg.s);
            let (u_s, v_s) = svd.columns(&idx)?;
            // The SVD is formed on the host; the frozen directions live with the weight.
            let dev = l.weight.device();
            let (u_s, v_s) = (u_s.to_device(dev)?, v_s.to_device(dev)?);
            let k = svd.k();
            layers.insert(
                l.path.clone(),
                LayerSelection {
                    indices: idx.clone(),
                    sigma: idx.iter().map(|&i| svd.sigma[i]).collect(),
                    delta: idx.iter().map(|&i| delta[i]).collect(),
                    percentile: idx.iter().map(|&i| percentile(i, k)).collect(),
                },
            );
            full_delta.insert(l.path.clone(), delta);
            self.state.indices.insert(l.path.clone(), idx.clone());
            let d = DashLayer::new(lora, u_s, v_s, idx, self.cfg.freeze_ab)?;
            new_vars.push((format!("{}.dash_c", l.path), d.c.clone()));
            l.adapter = Some(Adapter::Dash(d));
        }
        self.state.switched = true;
        let report = TsdReport {
            t: self.cfg.t,
            s: self.cfg.s,
            stall_s: stall,
            switch_s: start.elapsed().as_secs_f64(),
            layers,
        };
        Ok((new_vars, report, full_delta))
    }

    /// Rebuilds the dash form from saved indices (resume after the switch). Values of A, B
    /// and c are restored by the caller from the checkpoint.
    pub fn restore(&mut self, model: &mut dyn Model, state: &DashState) -> Result<()> {
        for l in model.linears_mut() {
            let Some(Adapter::Lora(lora)) = l.adapter.take() else {
                continue;
            };
            let idx = state
                .indices
                .get(&l.path)
                .ok_or_else(|| {
                    Error::msg(format!("checkpoint has no Dash selection for `{}`", l.path))
                })?
                .clone();
            let svd = self.prefetch.wait(&l.path)?;
            let (u_s, v_s) = svd.columns(&idx)?;
            // The SVD is formed on the host; the frozen directions live with the weight.
            let dev = l.weight.device();
            let (u_s, v_s) = (u_s.to_device(dev)?, v_s.to_device(dev)?);
            l.adapter = Some(Adapter::Dash(DashLayer::new(
                lora,
                u_s,
                v_s,
                idx,
                self.cfg.freeze_ab,
            )?));
        }
        self.state = state.clone();
        Ok(())
    }
}

/// Writes `tsd.json` and the full δ vectors (`tsd_delta.safetensors`) into `dir`.
pub fn write_report(
    dir: &Path,
    report: &TsdReport,
    full_delta: &BTreeMap<String, Vec<f32>>,
) -> Result<()> {
    atomic::write_file(
        &dir.join(TSD_FILE),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    let tensors: Vec<(String, Tensor)> = full_delta
        .iter()
        .map(|(k, v)| {
            Ok((
                k.clone(),
                Tensor::from_vec(v.clone(), v.len(), &crate::device::host())?,
            ))
        })
        .collect::<Result<_>>()?;
    save_tensors(
        tensors.iter().map(|(k, t)| (k.as_str(), t)),
        &dir.join(DELTA_FILE),
        None,
    )
}
