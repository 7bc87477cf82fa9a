//! AdamW against an f64 reimplementation of the documented update and against PyTorch.

use super::*;
use candle_core::Device;

const P0: [f32; 6] = [0.5, -1.0, 2.0, 0.0, 0.25, -3.0];
const Q0: [f32; 2] = [1.5, -0.5];
const GP: [[f32; 6]; 3] = [
    [0.1, -0.2, 0.3, -0.4, 0.5, -0.6],
    [1.0, 0.0, -1.0, 2.0, -2.0, 0.5],
    [-0.3, 0.7, 0.2, 0.05, -0.9, 1.2],
];
const GQ: [[f32; 2]; 3] = [[2.0, -1.0], [0.5, 3.0], [-1.0, -2.0]];
const LRS: [f64; 3] = [1e-2, 2e-2, 5e-3];
const CFG: AdamWConfig = AdamWConfig {
    lr: 1e-2,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.1,
};

fn vars() -> Vec<(String, Var)> {
    let cpu = Device::Cpu;
    vec![
        (
            "p".into(),
            Var::from_tensor(&Tensor::new(&P0, &cpu).unwrap().reshape((2, 3)).unwrap()).unwrap(),
        ),
        (
            "q".into(),
            Var::from_tensor(&Tensor::new(&Q0, &cpu).unwrap()).unwrap(),
        ),
    ]
}

/// Gradients equal to `gp`, `gq` through real backprop: d/dp sum(p * c) = c.
fn grads(params: &[(String, Var)], k: usize) -> GradStore {
    let cpu = Device::Cpu;
    let cp = Tensor::new(&GP[k], &cpu).unwrap().reshape((2, 3)).unwrap();
    let cq = Tensor::new(&GQ[k], &cpu).unwrap();
    let lp = (params[0].1.as_tensor() * cp).unwrap().sum_all().unwrap();
    let lq = (params[1].1.as_tensor() * cq).unwrap().sum_all().unwrap();
    (lp + lq).unwrap().backward().unwrap()
}

fn values(params: &[(String, Var)]) -> Vec<f32> {
    params
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// AdamW written from the update rule in the torch.optim.AdamW documentation, in f64.
fn reference(steps: usize, clip: Option<f64>) -> Vec<f64> {
    let mut x: Vec<f64> = P0.iter().chain(&Q0).map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0f64; 8], vec![0f64; 8]);
    for k in 0..steps {
        let mut g: Vec<f64> = GP[k].iter().chain(&GQ[k]).map(|&v| v as f64).collect();
        if let Some(max) = clip {
            let n = g.iter().map(|a| a * a).sum::<f64>().sqrt();
            let c = (max / (n + 1e-6)).min(1.0);
            g.iter_mut().for_each(|a| *a *= c);
        }
        let (lr, t) = (LRS[k], (k + 1) as i32);
        for i in 0..8 {
            x[i] -= lr * CFG.weight_decay * x[i];
            m[i] = CFG.beta1 * m[i] + (1.0 - CFG.beta1) * g[i];
            v[i] = CFG.beta2 * v[i] + (1.0 - CFG.beta2) * g[i] * g[i];
            let mhat = m[i] / (1.0 - CFG.beta1.powi(t));
            let vhat = v[i] / (1.0 - CFG.beta2.powi(t));
            x[i] -= lr * mhat / (vhat.sqrt() + CFG.eps);
        }
    }
    x
}

fn max_diff(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&a, b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
}

// torch 2.5.1 torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1) on CPU,
// after step 3 with the gradients and learning rates above (p then q, flattened).
const TORCH_3: [f64; 8] = [
    0.47006818652153015,
    -0.9754946231842041,
    1.994807243347168,
    -0.004376358352601528,
    0.2535955309867859,
    -2.9813709259033203,
    1.4666838645935059,
    -0.4980616867542267,
];
// The same with torch.nn.utils.clip_grad_norm_(params, 1.0) before every step.
const TORCH_3_CLIP: [f64; 8] = [
    0.4696085453033447,
    -0.9753574132919312,
    1.9900776147842407,
    -0.0013718267437070608,
    0.25019314885139465,
    -2.975646734237671,
    1.468024730682373,
    -0.4927668869495392,
];
const TORCH_NORMS: [f64; 3] = [2.431049108505249, 4.41588020324707, 2.805797576904297];

#[test]
fn three_steps_match_reference_and_torch() {
    for (clip, device) in [
        (None, false),
        (Some(1.0), false),
        (None, true),
        (Some(1.0), true),
    ] {
        println!("state as device tensors: {device}");
        let params = vars();
        let mut opt = AdamW::new(vec![], CFG).unwrap();
        if device {
            opt.force_device_state();
        }
        opt.add_params(params.clone()).unwrap();
        for k in 0..3 {
            let g = grads(&params, k);
            if let Some(max) = clip {
                let n = opt.clip_grad_norm(&g, max).unwrap();
                assert!(
                    (n - TORCH_NORMS[k]).abs() < 1e-6,
                    "norm {n} vs {}",
                    TORCH_NORMS[k]
                );
            }
            opt.step(&g, LRS[k]).unwrap();
            let d = max_diff(&values(&params), reference(k + 1, clip));
            println!(
                "clip {clip:?} step {}: max |diff| vs f64 reference = {d:e}",
                k + 1
            );
            assert!(d < 2e-6, "{d}");
        }
        let torch = if clip.is_some() {
            TORCH_3_CLIP
        } else {
            TORCH_3
        };
        let d = max_diff(&values(&params), torch);
        println!("clip {clip:?}: max |diff| vs torch = {d:e}");
        // Within an f32 rounding step of PyTorch's values.
        assert!(d < 1e-8, "{d}");
    }
}

#[test]
fn missing_gradient_is_an_error_and_changes_nothing() {
    let params = vars();
    let extra = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(params.clone(), CFG).unwrap();
    opt.add_params(vec![("dash.w".into(), extra)]).unwrap();
    let before = values(&params);
    let err = opt.step(&grads(&params, 0), 1e-2).unwrap_err();
    assert!(
        matches!(&err, Error::NoGradient(n) if n == "dash.w"),
        "{err:?}"
    );
    assert_eq!(values(&params), before);
    assert!(opt
        .add_params(vec![("p".into(), params[0].1.clone())])
        .is_err());
    // Dropping the gradient-less parameter makes the step valid again.
    opt.retain(|n| n != "dash.w");
    assert_eq!(
        opt.params().map(|(n, _)| n).collect::<Vec<_>>(),
        vec!["p", "q"]
    );
    opt.step(&grads(&params, 0), LRS[0]).unwrap();
    let d = max_diff(&values(&params), reference(1, None));
    assert!(d < 2e-6, "{d}");
}

#[test]
fn state_round_trip_continues_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let params = vars();
    let mut opt = AdamW::new(params.clone(), CFG).unwrap();
    opt.step(&grads(&params, 0), LRS[0]).unwrap();
    let st = opt.state_tensors().unwrap();
    crate::io::weights::save_tensors(st.iter().map(|(n, t)| (n.as_str(), t)), &path, None).unwrap();
    let snapshot = values(&params);

    // Continue the original.
    for (k, &lr) in LRS.iter().enumerate().skip(1) {
        opt.step(&grads(&params, k), lr).unwrap();
    }
    let expected = values(&params);

    // Fresh parameters at the snapshot, fresh optimizer, loaded state.
    let cpu = Device::Cpu;
    let fresh = vec![
        (
            "p".to_string(),
            Var::from_tensor(
                &Tensor::new(&snapshot[..6], &cpu)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            )
            .unwrap(),
        ),
        (
            "q".to_string(),
            Var::from_tensor(&Tensor::new(&snapshot[6..], &cpu).unwrap()).unwrap(),
        ),
    ];
    let mut opt2 = AdamW::new(fresh.clone(), CFG).unwrap();
    opt2.load_state(&Weights::load_safetensors(&path).unwrap())
        .unwrap();
    for (k, &lr) in LRS.iter().enumerate().skip(1) {
        opt2.step(&grads(&fresh, k), lr).unwrap();
    }
    assert_eq!(
        values(&fresh),
        expected,
        "resumed steps must be bit-identical"
    );

    // A state for a different parameter set is refused.
    let mut other = AdamW::new(vec![fresh[0].clone()], CFG).unwrap();
    assert!(other
        .load_state(&Weights::load_safetensors(&path).unwrap())
        .is_err());
    let mut bigger = AdamW::new(fresh.clone(), CFG).unwrap();
    let z = Var::from_tensor(&Tensor::zeros(2, DType::F32, &cpu).unwrap()).unwrap();
    bigger.add_params(vec![("r".into(), z)]).unwrap();
    let e = bigger
        .load_state(&Weights::load_safetensors(&path).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
}

#[test]
fn large_parameter_step_is_fast() {
    let n = 1 << 20;
    let cpu = Device::Cpu;
    let var = Var::from_tensor(&Tensor::ones(n, DType::F32, &cpu).unwrap()).unwrap();
    let loss = (var.as_tensor() * 0.5).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], CFG).unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..5 {
        opt.step(&g, 1e-3).unwrap();
    }
    let per_step = t0.elapsed().as_secs_f64() / 5.0;
    println!("AdamW step over {n} params: {:.2} ms", per_step * 1e3);
    // Constant gradient: each step moves by about lr (m̂/√v̂ = 1), after decay.
    let w = var.as_tensor().to_vec1::<f32>().unwrap();
    let expect = reference_const(5, 1.0, 0.5, 1e-3);
    let d = w
        .iter()
        .map(|&x| (x as f64 - expect).abs())
        .fold(0.0, f64::max);
    println!("max |diff| vs f64 reference = {d:e}");
    assert!(d < 1e-6, "{d}");
    assert!(per_step < 0.5, "step took {per_step} s");
}

fn reference_const(steps: i32, x0: f64, g: f64, lr: f64) -> f64 {
    let (mut x, mut m, mut v) = (x0, 0.0, 0.0);
    for t in 1..=steps {
        x -= lr * CFG.weight_decay * x;
        m = CFG.beta1 * m + (1.0 - CFG.beta1) * g;
        v = CFG.beta2 * v + (1.0 - CFG.beta2) * g * g;
        x -= lr * (m / (1.0 - CFG.beta1.powi(t)))
            / ((v / (1.0 - CFG.beta2.powi(t))).sqrt() + CFG.eps);
    }
    x
}

/// A parameter group with `lr·scale`: the selected parameter moves exactly as it does under
/// the scaled rate, the others exactly as under the base rate, and scale 1 changes nothing.
#[test]
fn lr_scale_scales_only_the_selected_parameters() {
    let run = |scale: Option<f64>, lr_mul: f64| -> Vec<f32> {
        let params = vars();
        let mut opt = AdamW::new(params.clone(), CFG).unwrap();
        if let Some(s) = scale {
            opt.set_lr_scale(|n| n == "q", s).unwrap();
        }
        for (k, lr) in LRS.iter().enumerate() {
            opt.step(&grads(&params, k), lr * lr_mul).unwrap();
        }
        values(&params)
    };
    let base = run(None, 1.0);
    let scaled = run(Some(3.0), 1.0);
    let all_scaled = run(None, 3.0);
    assert_eq!(&scaled[..6], &base[..6], "unselected parameter changed");
    assert_eq!(
        &scaled[6..],
        &all_scaled[6..],
        "selected parameter not at 3x lr"
    );
    assert_ne!(&scaled[6..], &base[6..]);
    let moved = |v: &[f32]| (v[6] - Q0[0]).abs() as f64;
    println!(
        "q[0] moved {:e} at 3x lr vs {:e} at 1x",
        moved(&scaled),
        moved(&base)
    );
    assert_eq!(run(Some(1.0), 1.0), base, "scale 1 is not bit-identical");
    let mut opt = AdamW::new(vars(), CFG).unwrap();
    assert!(opt.set_lr_scale(|_| true, 0.0).is_err());
    assert!(opt.set_lr_scale(|_| true, f64::NAN).is_err());
}

/// The device-tensor state (the path of parameters off the host, and of
/// `LORA_DASH_KERNELS=reference`) does the host loop's arithmetic element for element, and
/// its saved state continues a host run (and the other way round) bit-identically.
#[test]
fn device_state_matches_the_host_loop_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let run = |device: bool, resume_as: Option<bool>| -> Vec<f32> {
        let params = vars();
        let mk = |device: bool, params: &[(String, Var)]| {
            let mut opt = AdamW::new(vec![], CFG).unwrap();
            if device {
                opt.force_device_state();
            }
            opt.add_params(params.to_vec()).unwrap();
            opt
        };
        let mut opt = mk(device, &params);
        for (k, &lr) in LRS.iter().enumerate() {
            let g = grads(&params, k);
            opt.clip_grad_norm(&g, 1.0).unwrap();
            opt.step(&g, lr).unwrap();
            if k == 0 {
                if let Some(other) = resume_as {
                    let path = dir.path().join(format!("s{device}{other}.safetensors"));
                    let st = opt.state_tensors().unwrap();
                    crate::io::weights::save_tensors(
                        st.iter().map(|(n, t)| (n.as_str(), t)),
                        &path,
                        None,
                    )
                    .unwrap();
                    opt = mk(other, &params);
                    opt.load_state(&Weights::load_safetensors(&path).unwrap())
                        .unwrap();
                }
            }
        }
        values(&params)
    };
    let host = run(false, None);
    assert_eq!(run(true, None), host);
    assert_eq!(run(false, Some(true)), host);
    assert_eq!(run(true, Some(false)), host);
    let d = max_diff(&host, reference(3, Some(1.0)));
    assert!(d < 2e-6, "{d}");
}
