//! Attaching adapters to a model's linear layers by module path (PEFT's `inject_adapter`),
//! for any architecture behind [`Model`].

use crate::adapters::{Adapter, FullDelta, LoraConfig, LoraLayer, TargetModules};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::rng::Rng;

/// The module paths `targets` selects; `all-linear` leaves out the output heads.
fn selected(model: &dyn Model, targets: &TargetModules) -> Result<Vec<String>> {
    let m = targets.matcher()?;
    let paths: Vec<String> = model
        .linears()
        .into_iter()
        .map(|l| l.path.clone())
        .filter(|p| m.matches(p) && !(m.is_all_linear() && model.is_output_head(p)))
        .collect();
    if paths.is_empty() {
        return Err(Error::NoTargetMatch {
            spec: targets.describe(),
            example: model
                .linears()
                .first()
                .map(|l| l.path.clone())
                .unwrap_or_default(),
        });
    }
    Ok(paths)
}

/// Attaches freshly initialised LoRA factors to every matching linear layer. A's init
/// depends only on `seed` and the layer path. Returns the adapted paths.
pub fn inject_lora(model: &mut dyn Model, cfg: &LoraConfig, seed: u64) -> Result<Vec<String>> {
    cfg.validate()?;
    let paths = selected(model, &cfg.target_modules)?;
    let scale = cfg.scale();
    for l in model.linears_mut() {
        if paths.contains(&l.path) {
            let mut rng = Rng::derive(seed, &l.path);
            let lora = LoraLayer::init(
                l.in_dim(),
                l.out_dim(),
                cfg.r,
                scale,
                cfg.dropout,
                &mut rng,
                l.weight.device(),
            )?;
            l.adapter = Some(Adapter::Lora(lora));
        }
    }
    Ok(paths)
}

/// Makes every matching linear layer fully trainable, as a dense update ΔW = 0 on top of
/// the frozen weight. Returns the adapted paths.
pub fn inject_full(model: &mut dyn Model, targets: &TargetModules) -> Result<Vec<String>> {
    let paths = selected(model, targets)?;
    for p in &paths {
        model.check_full_finetune(p)?;
    }
    for l in model.linears_mut() {
        if paths.contains(&l.path) {
            l.adapter = Some(Adapter::Full(FullDelta::zeros(
                l.in_dim(),
                l.out_dim(),
                l.weight.device(),
            )?));
        }
    }
    Ok(paths)
}
