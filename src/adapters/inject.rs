//! Attaching adapters to a model's linear layers by module path (PEFT's `inject_adapter`),
//! for any architecture behind [`Model`].

use crate::adapters::pissa::check_rank;
use crate::adapters::{
    Adapter, DoraLayer, FullDelta, LoraConfig, LoraLayer, PissaLayer, SvdInit, TargetModules,
};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::rng::Rng;
use crate::tsd::svd::SvdCache;

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

/// Methods that change the frozen weight itself (a residual, a rescaled W) cannot target a
/// layer whose merged weight the model could not hold (an output head tied to the
/// embeddings).
fn check_weight_changing(model: &dyn Model, paths: &[String], method: &str) -> Result<()> {
    for p in paths {
        if model.check_full_finetune(p).is_err() {
            return Err(Error::config(
                "target_modules",
                format!("--method {method} does not support `{p}`: the layer shares its weight with the embeddings, and {method} changes that weight"),
            ));
        }
    }
    Ok(())
}

/// DoRA: every matching linear layer gets PEFT's LoRA init (A from `seed` and the layer
/// path, as [`inject_lora`]) and a magnitude vector m = ‖W‖_row. Returns the adapted paths.
pub fn inject_dora(model: &mut dyn Model, cfg: &LoraConfig, seed: u64) -> Result<Vec<String>> {
    cfg.validate()?;
    let paths = selected(model, &cfg.target_modules)?;
    check_weight_changing(model, &paths, "dora")?;
    let scale = cfg.scale();
    for l in model.linears_mut() {
        if paths.contains(&l.path) {
            let mut rng = Rng::derive(seed, &l.path);
            let dev = l.weight.device().clone();
            let d = DoraLayer::init(&l.weight, cfg.r, scale, cfg.dropout, &mut rng, &dev)?;
            l.adapter = Some(Adapter::Dora(d));
        }
    }
    Ok(paths)
}

/// PiSSA / MiLoRA: every matching linear layer gets A₀, B₀ from r singular triplets of its
/// weight (SVDs through `cache`, keyed by weight hash) and keeps the residual
/// W − s·B₀·A₀ as its frozen weight. A rank above min(out, in) of any target is refused
/// before any layer changes. Returns the adapted paths.
pub fn inject_svd_init(
    model: &mut dyn Model,
    cfg: &LoraConfig,
    init: SvdInit,
    cache: &SvdCache,
) -> Result<Vec<String>> {
    cfg.validate()?;
    let paths = selected(model, &cfg.target_modules)?;
    check_weight_changing(model, &paths, init.name())?;
    for l in model.linears() {
        if paths.contains(&l.path) {
            check_rank(&l.path, cfg.r, l.out_dim(), l.in_dim())?;
        }
    }
    let scale = cfg.scale();
    let threads = rayon::current_num_threads();
    for l in model.linears_mut() {
        if paths.contains(&l.path) {
            let (svd, _) = cache.get_or_compute(&l.weight, threads)?;
            let (p, residual) = PissaLayer::init(&l.weight, &svd, init, cfg.r, scale, cfg.dropout)?;
            l.weight = residual;
            l.adapter = Some(Adapter::Pissa(p));
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
