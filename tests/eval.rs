//! `lora-dash eval` and what it is built on: task detection, answer extraction, greedy and
//! beam decoding against transformers' `generate` (tests/golden/tiny_generate.json), batched
//! likelihood scoring against a naive per-candidate computation, the output files, adapters
//! and merged models, and the error cases.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{golden, missing_fixture, require_shared_data, require_smollm2, shared_data};
use lora_dash::cli::{run, Cli};
use lora_dash::data::{eval_prompt, load_records, Record};
use lora_dash::eval::likelihood::{score_batch, score_naive, tokenize_candidates, Candidates};
use lora_dash::eval::{continuation, detect_task, response_text, task_name, Family, Task};
use lora_dash::io::{self, TextTokenizer};
use lora_dash::models::beam::generate_beam;
use lora_dash::models::generate::generate_greedy;
use lora_dash::models::prefill::{prefill_sharing, shared_prefix_len, Prefilled};
use lora_dash::models::{Ctx, Llama};
use lora_dash::Error;
use serde_json::Value;

use clap::Parser;

fn tiny() -> (TextTokenizer, Llama) {
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    let m = Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap();
    (loaded.tokenizer.unwrap(), m)
}

fn rec(instruction: &str, answer: &str) -> Record {
    Record {
        instruction: instruction.into(),
        input: String::new(),
        output: format!("the correct answer is {answer}"),
        answer: Some(answer.into()),
    }
}

/// Small ARC-like records: the question lists `n` options.
fn arc_like(n: usize, answers: &[usize]) -> Vec<Record> {
    answers
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let opts: Vec<String> = (1..=n).map(|k| format!("Answer{k}: option {k} of question {i}.")).collect();
            let format: Vec<String> = (1..=n).map(|k| format!("answer{k}")).collect();
            rec(
                &format!("Please choose the correct answer to the question: What is item {i}?\n\n{}\n\nAnswer format: {}", opts.join(" "), format.join("/")),
                &format!("answer{a}"),
            )
        })
        .collect()
}

fn write_json(dir: &Path, name: &str, recs: &[Record]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(recs).unwrap()).unwrap();
    p
}

fn run_cli(args: &[&str]) -> lora_dash::Result<()> {
    let mut full = vec!["lora-dash", "eval"];
    full.extend_from_slice(args);
    run(Cli::try_parse_from(full).expect("arguments parse"))
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn detects_tasks_on_shared_files() {
    let Some(data) = require_shared_data() else {
        return;
    };
    // (directory, family, options): ARC-Easy has one 5-option question, hence 5.
    let want = [
        ("ARC-Easy", Family::Answer, 5),
        ("ARC-Challenge", Family::Answer, 4),
        ("openbookqa", Family::Answer, 4),
        ("boolq", Family::TrueFalse, 2),
        ("piqa", Family::Solution, 2),
    ];
    for (dir, family, n) in want {
        let p = data.join("commonsense").join(dir).join("test.json");
        if !p.exists() {
            missing_fixture(&p.display().to_string(), "see ../shared/data/README.md");
            continue;
        }
        let recs = load_records(std::slice::from_ref(&p)).unwrap();
        let t = detect_task(&task_name(&p), &p, &recs).unwrap();
        println!(
            "{}: {:?}, {} options, {} records",
            t.name,
            t.family,
            t.num_choices,
            recs.len()
        );
        assert_eq!((t.name.as_str(), t.family, t.num_choices), (dir, family, n));
        // Every record's own option list is a prefix of the vocabulary and holds its answer.
        for r in &recs {
            let c = t.candidates_for(r);
            assert!(c.contains(r.answer.as_ref().unwrap()), "{c:?}");
            assert_eq!(c, family.words()[..c.len()].to_vec());
        }
    }
}

#[test]
fn detects_tasks_on_handmade_records() {
    let p = Path::new("dir/hella.json");
    let endings: Vec<Record> = ["ending2", "ending4", "ending1"]
        .iter()
        .map(|a| rec("q", a))
        .collect();
    let t = detect_task("hella", p, &endings).unwrap();
    assert_eq!((t.family, t.num_choices), (Family::Ending, 4));
    let wino: Vec<Record> = ["option1", "option2"].iter().map(|a| rec("q", a)).collect();
    assert_eq!(detect_task("w", p, &wino).unwrap().family, Family::Option);
    // Social IQa style: three options, seen as the largest answer index.
    let siqa: Vec<Record> = ["answer1", "answer3", "answer2"]
        .iter()
        .map(|a| rec("q", a))
        .collect();
    let t = detect_task("siqa", p, &siqa).unwrap();
    assert_eq!((t.family, t.num_choices), (Family::Answer, 3));
    assert_eq!(t.candidates(), vec!["answer1", "answer2", "answer3"]);
    assert_eq!(
        t.candidates_for(&arc_like(4, &[1])[0]),
        vec!["answer1", "answer2", "answer3", "answer4"]
    );
    let tf: Vec<Record> = ["true", "false", "true"]
        .iter()
        .map(|a| rec("q", a))
        .collect();
    let t = detect_task("b", p, &tf).unwrap();
    assert_eq!(
        (t.family, t.candidates()),
        (Family::TrueFalse, vec!["true".to_string(), "false".into()])
    );

    // Names: the stem, or the directory for generic split names.
    assert_eq!(task_name(Path::new("a/boolq/test.json")), "boolq");
    assert_eq!(task_name(Path::new("a/my_hellaswag.jsonl")), "my_hellaswag");

    // Errors name the file and the offending record.
    let mixed: Vec<Record> = ["answer1", "answer2", "true"]
        .iter()
        .map(|a| rec("q", a))
        .collect();
    let e = detect_task("m", p, &mixed).unwrap_err();
    println!("{e}");
    assert!(
        matches!(&e, Error::Record { index: 2, path, .. } if path == p),
        "{e:?}"
    );
    let unknown: Vec<Record> = ["yes", "no"].iter().map(|a| rec("q", a)).collect();
    let e = detect_task("u", p, &unknown).unwrap_err();
    println!("{e}");
    assert!(
        e.to_string().contains("dir/hella.json") && e.to_string().contains("`yes`"),
        "{e}"
    );
    let mut missing = tf.clone();
    missing[1].answer = None;
    let e = detect_task("x", p, &missing).unwrap_err();
    assert!(matches!(e, Error::Record { index: 1, .. }), "{e:?}");
    assert!(detect_task("x", p, &[]).is_err());
}

#[test]
fn extract_answer_like_reference() {
    let mc = Task::new("arc", Family::Answer, 4).unwrap();
    // (response, expected): first match of the alternation, anywhere, answer5 included.
    let cases = [
        ("the correct answer is answer3", Some("answer3")),
        ("  answer2 or answer1  ", Some("answer2")),
        ("I think Answer1 is right", None),
        ("the correct answer is answer5", Some("answer5")),
        ("answer12", Some("answer1")),
        ("no idea", None),
        ("", None),
    ];
    for (resp, want) in cases {
        assert_eq!(mc.extract_answer(resp).as_deref(), want, "{resp:?}");
    }
    let tf = Task::new("boolq", Family::TrueFalse, 2).unwrap();
    assert_eq!(tf.extract_answer("that is untrue").as_deref(), Some("true"));
    assert_eq!(
        tf.extract_answer("False, then false").as_deref(),
        Some("false")
    );
    let piqa = Task::new("piqa", Family::Solution, 2).unwrap();
    assert_eq!(
        piqa.extract_answer("solution3 then solution2").as_deref(),
        Some("solution2")
    );
    let hs = Task::new("h", Family::Ending, 4).unwrap();
    assert_eq!(hs.extract_answer("ending4.").as_deref(), Some("ending4"));
    let w = Task::new("w", Family::Option, 2).unwrap();
    assert_eq!(
        w.extract_answer("option2option1").as_deref(),
        Some("option2")
    );
    // The text after the last `### Response:`, stripped, as the reference keeps it.
    assert_eq!(
        response_text(" x ### Response:\n   the correct answer is answer1 \n"),
        "the correct answer is answer1"
    );
    assert_eq!(response_text("  plain  "), "plain");
    assert!(Task::new("bad", Family::Answer, 6).is_err());
}

#[test]
fn continuation_substitutes_the_answer() {
    let r = rec("q", "answer3");
    assert_eq!(continuation(&r, "answer1"), "the correct answer is answer1");
    let mut odd = r.clone();
    odd.output = "answer3 because answer3".into();
    assert_eq!(continuation(&odd, "answer2"), "answer3 because answer2");
    odd.output = "something else".into();
    assert_eq!(continuation(&odd, "answer2"), "answer2");
}

#[test]
fn greedy_and_beam_match_transformers() {
    let (tok, m) = tiny();
    let g = read_json(&golden("tiny_generate.json"));
    let prompts: Vec<Vec<u32>> = g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| tok.encode(p.as_str().unwrap()).unwrap())
        .collect();
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(g["prompt_ids"].clone()).unwrap();
    assert_eq!(prompts, want_ids, "tokenizer differs from transformers");
    let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
    for case in g["cases"].as_array().unwrap() {
        let k = case["num_beams"].as_u64().unwrap() as usize;
        let eos: Vec<u32> = serde_json::from_value(case["eos"].clone()).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(case["generated"].clone()).unwrap();
        let got = if k == 1 {
            generate_greedy(&m, &prompts, 0, max_new, &eos).unwrap()
        } else {
            generate_beam(&m, &prompts, 0, max_new, &eos, k, 1.0).unwrap()
        };
        println!(
            "num_beams {k}, eos {eos:?}: lengths {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(got, want, "num_beams {k}, eos {eos:?}");
        // Each prompt alone decodes the same as in the left-padded batch.
        for (p, w) in prompts.iter().zip(&want) {
            let alone = if k == 1 {
                generate_greedy(&m, std::slice::from_ref(p), 0, max_new, &eos).unwrap()
            } else {
                generate_beam(&m, std::slice::from_ref(p), 0, max_new, &eos, k, 1.0).unwrap()
            };
            assert_eq!(&alone[0], w);
        }
    }
}

#[test]
fn beam_search_with_one_beam_is_greedy() {
    let (tok, m) = tiny();
    let recs = arc_like(4, &[1, 2, 3, 4, 2]);
    let mut prompts: Vec<Vec<u32>> = recs
        .iter()
        .map(|r| tok.encode(&eval_prompt(&r.instruction, None)).unwrap())
        .collect();
    prompts.push(tok.encode("short").unwrap());
    // Frequent tokens as extra EOS ids make rows stop at different steps.
    let greedy0 = generate_greedy(&m, &prompts, 0, 20, &[2]).unwrap();
    let mut eos = vec![2u32];
    eos.extend(greedy0.iter().filter_map(|g| g.get(3).copied()).take(2));
    eos.dedup();
    for eos in [vec![2u32], eos] {
        let greedy = generate_greedy(&m, &prompts, 0, 20, &eos).unwrap();
        let beam = generate_beam(&m, &prompts, 0, 20, &eos, 1, 1.0).unwrap();
        println!(
            "eos {eos:?}: lengths {:?}",
            greedy.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(beam, greedy);
    }
}

#[test]
fn likelihood_batched_equals_naive() {
    let (tok, m) = tiny();
    let mut recs = arc_like(4, &[1, 3, 2]);
    recs.extend(arc_like(3, &[2]));
    recs.push(Record {
        input: "a passage to read".into(),
        ..rec("Is the sky blue? Answer format: true/false", "true")
    });
    let tasks = [
        Task::new("a", Family::Answer, 4).unwrap(),
        Task::new("b", Family::TrueFalse, 2).unwrap(),
    ];
    let items: Vec<_> = recs
        .iter()
        .map(|r| {
            let t = if r.answer.as_deref() == Some("true") {
                &tasks[1]
            } else {
                &tasks[0]
            };
            let conts: Vec<String> = t
                .candidates_for(r)
                .iter()
                .map(|c| continuation(r, c))
                .collect();
            let prompt = eval_prompt(&r.instruction, Some(&r.input));
            let it = tokenize_candidates(&tok, &prompt, &conts).unwrap();
            // Context + continuation is exactly the joint tokenisation.
            for (c, ids) in conts.iter().zip(&it.continuations) {
                let joint = tok.encode(&format!("{prompt}{c}")).unwrap();
                assert_eq!([it.context.as_slice(), ids].concat(), joint);
            }
            it
        })
        .collect();
    // Hand-made items: candidates sharing no start, and sharing two tokens before remainders
    // of one to three tokens (scored once in the prefill, then in the remainder forward).
    let mut items = items;
    let ctx0 = items[0].context.clone();
    items.push(Candidates {
        context: ctx0[..ctx0.len() - 3].to_vec(),
        continuations: vec![vec![5, 6, 7], vec![8, 9], vec![10]],
    });
    items.push(Candidates {
        context: ctx0[..ctx0.len() - 7].to_vec(),
        continuations: vec![
            vec![11, 12, 13],
            vec![11, 12, 14, 15, 16],
            vec![11, 12, 17, 18],
        ],
    });
    let batched = score_batch(&m, &items, tok.pad_or_eos()).unwrap();
    let mut max_diff = 0f64;
    for (it, b) in items.iter().zip(&batched) {
        let naive = score_naive(&m, it).unwrap();
        assert_eq!(naive.len(), b.len());
        for (x, y) in naive.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
    println!(
        "batched vs naive log-prob sums: max |diff| = {max_diff:.3e} over {} items",
        items.len()
    );
    assert!(max_diff < 1e-3);
    // Batch composition does not change a score.
    let alone = score_batch(&m, &items[2..3], 0).unwrap();
    let d = alone[0]
        .iter()
        .zip(&batched[2])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("alone vs in batch: max |diff| = {d:.3e}");
    assert!(d < 1e-3);
}

/// The shared-prefix prompt forward (`models::prefill`) computes what one left-padded forward
/// of the whole prompts computes: the last hidden states, and (through the cache and key
/// mask it leaves) the next decoding step; greedy decoding of the batch equals each prompt
/// decoded alone.
#[test]
fn shared_prefix_prefill_equals_plain_prefill() {
    let (tok, m) = tiny();
    // Prompts of different lengths, so the rows after the shared prefix are padded.
    let mut recs = arc_like(4, &[1, 2, 3]);
    recs.extend(arc_like(2, &[1]));
    recs.extend(arc_like(5, &[4]));
    let prompts: Vec<Vec<u32>> = recs
        .iter()
        .map(|r| tok.encode(&eval_prompt(&r.instruction, None)).unwrap())
        .collect();
    let p = shared_prefix_len(&prompts, 1);
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    println!("prompt lengths {lens:?}, shared prefix {p}");
    assert!(p >= 30, "the template's prefix should be shared, got {p}");
    let ctx = Ctx::eval();
    let max_abs = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let mut plain = prefill_sharing(&m, &prompts, 0, 0, 1, &ctx).unwrap();
    let mut shared = prefill_sharing(&m, &prompts, 0, p, 1, &ctx).unwrap();
    assert_eq!(shared.shared, p);
    assert_eq!(plain.lens, shared.lens);
    let d0 = max_abs(&plain.tail, &shared.tail);
    // One decoding step of the same tokens on both caches.
    let b = prompts.len();
    let next: Vec<u32> = (0..b as u32).map(|i| 5 + i).collect();
    let pos: Vec<u32> = plain.lens.iter().map(|&l| l as u32).collect();
    let step = |pre: &mut Prefilled| -> Tensor {
        let w = pre.width;
        let mut mask = Vec::new();
        for i in 0..b {
            mask.extend_from_slice(&pre.mask[i * w..(i + 1) * w]);
            mask.push(1.0);
        }
        let dev = candle_core::Device::Cpu;
        m.forward_hidden(
            &Tensor::from_vec(next.clone(), (b, 1), &dev).unwrap(),
            Some(&Tensor::from_vec(mask, (b, w + 1), &dev).unwrap()),
            Some(&Tensor::from_vec(pos.clone(), (b, 1), &dev).unwrap()),
            Some(&mut pre.cache),
            &ctx,
        )
        .unwrap()
    };
    let d1 = max_abs(&step(&mut plain), &step(&mut shared));
    println!("max |diff| of hidden states: prompt {d0:.2e}, next step {d1:.2e}");
    assert!(d0 < 1e-4 && d1 < 1e-4);
    // Shares a prefix only where it saves work.
    assert_eq!(shared_prefix_len(&prompts[..1], 1), 0);
    assert!(prefill_sharing(
        &m,
        &prompts,
        0,
        lens.iter().copied().min().unwrap(),
        1,
        &ctx
    )
    .is_err());
    let batched = generate_greedy(&m, &prompts, 0, 10, &[2]).unwrap();
    for (p, g) in prompts.iter().zip(&batched) {
        assert_eq!(
            &generate_greedy(&m, std::slice::from_ref(p), 0, 10, &[2]).unwrap()[0],
            g
        );
    }
}

/// Runs `eval` into `out` and checks the files against each other; returns the predictions.
fn check_run(args: &[&str], out: &Path, tasks: &[(&str, usize)], mode: &str) -> Vec<Value> {
    let mut a: Vec<&str> = args.to_vec();
    let out_s = out.to_str().unwrap();
    a.extend(["--out", out_s, "--overwrite"]);
    run_cli(&a).unwrap();
    let preds = read_jsonl(&out.join("predictions.jsonl"));
    let res = read_json(&out.join("results.json"));
    println!("{mode}: {res}");
    assert_eq!(preds.len(), tasks.iter().map(|t| t.1).sum::<usize>());
    let mut accs = Vec::new();
    for &(name, n) in tasks {
        let mine: Vec<&Value> = preds.iter().filter(|p| p["task"] == name).collect();
        assert_eq!(mine.len(), n, "{name}");
        for (i, p) in mine.iter().enumerate() {
            assert_eq!(p["index"].as_u64(), Some(i as u64));
            let correct = p["prediction"].is_string() && p["prediction"] == p["label"];
            assert_eq!(p["correct"].as_bool(), Some(correct), "{p}");
            match mode {
                "generate" => assert!(p["raw"].is_string(), "{p}"),
                _ => {
                    let scores = p["raw"].as_object().unwrap();
                    assert!(
                        scores.len() >= 2
                            && scores
                                .values()
                                .all(|v| v.as_f64().is_some_and(|x| x.is_finite() && x < 0.0)),
                        "{p}"
                    );
                    assert!(scores.contains_key(p["prediction"].as_str().unwrap()));
                }
            }
        }
        let correct = mine.iter().filter(|p| p["correct"] == true).count();
        let r = &res[name];
        assert_eq!(r["mode"], mode);
        assert_eq!(r["total"].as_u64(), Some(n as u64));
        assert_eq!(r["correct"].as_u64(), Some(correct as u64));
        assert!((r["accuracy"].as_f64().unwrap() - correct as f64 / n as f64).abs() < 1e-12);
        accs.push(correct as f64 / n as f64);
    }
    let avg = accs.iter().sum::<f64>() / accs.len() as f64;
    assert!((res["average"].as_f64().unwrap() - avg).abs() < 1e-12);
    preds
}

#[test]
fn cli_generate_and_likelihood_plumbing() {
    let d = tempfile::tempdir().unwrap();
    let arc = write_json(d.path(), "mini_arc.json", &arc_like(4, &[2, 1, 4, 3, 1, 2]));
    let mut files = vec![arc.to_str().unwrap().to_string()];
    let mut tasks = vec![("mini_arc", 4)];
    if let Some(data) = shared_data() {
        for t in ["ARC-Easy", "boolq"] {
            let p = data.join("commonsense").join(t).join("test.json");
            if p.exists() {
                files.push(p.to_str().unwrap().to_string());
                tasks.push((t, 4));
            }
        }
    }
    let model = golden("tiny-llama");
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--limit",
        "4",
        "--batch-size",
        "3",
        "--data",
    ];
    args.extend(files.iter().map(String::as_str));
    let g = check_run(
        &[args.as_slice(), &["--max-new-tokens", "6"]].concat(),
        &d.path().join("gen"),
        &tasks,
        "generate",
    );
    let b = check_run(
        &[
            args.as_slice(),
            &["--max-new-tokens", "6", "--num-beams", "2"],
        ]
        .concat(),
        &d.path().join("beam"),
        &tasks,
        "generate",
    );
    assert_eq!(g.len(), b.len());
    let l = check_run(
        &[args.as_slice(), &["--mode", "likelihood"]].concat(),
        &d.path().join("ll"),
        &tasks,
        "likelihood",
    );
    // The mini ARC file offers 4 options per record.
    assert_eq!(l[0]["raw"].as_object().unwrap().len(), 4);
}

/// Likelihood scores of the first `n` predictions, flattened.
fn scores(preds: &[Value]) -> Vec<f64> {
    preds
        .iter()
        .flat_map(|p| {
            p["raw"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn adapters_and_merged_models_evaluate_consistently() {
    let d = tempfile::tempdir().unwrap();
    let arc = write_json(d.path(), "mini_arc.json", &arc_like(4, &[2, 1, 4]));
    let model = golden("tiny-llama");
    let base_args = [
        "--model",
        model.to_str().unwrap(),
        "--mode",
        "likelihood",
        "--data",
        arc.to_str().unwrap(),
    ];
    let tasks = [("mini_arc", 3)];
    let with = |adapter: Option<&Path>, m: Option<&Path>, out: &str| {
        let mut a: Vec<&str> = base_args.to_vec();
        if let Some(m) = m {
            a[1] = m.to_str().unwrap();
        }
        if let Some(ad) = adapter {
            a.extend(["--adapter", ad.to_str().unwrap()]);
        }
        scores(&check_run(&a, &d.path().join(out), &tasks, "likelihood"))
    };
    let base = with(None, None, "base");
    let lora = with(Some(&golden("tiny-lora")), None, "lora");
    assert!(
        max_abs_diff(&base, &lora) > 1e-3,
        "the adapter changes nothing"
    );

    // Base + PEFT adapter equals the merged Hugging Face directory.
    let merged = d.path().join("merged");
    run(Cli::try_parse_from([
        "lora-dash",
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        golden("tiny-lora").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ])
    .unwrap())
    .unwrap();
    let m = with(None, Some(&merged), "merged_eval");
    let diff = max_abs_diff(&lora, &m);
    println!("base+LoRA vs merged: max |diff| = {diff:.3e}");
    assert!(diff < 1e-3);

    // Native Dash adapter equals its rank-(r+s) PEFT export.
    let dash = with(Some(&golden("tiny-dash")), None, "dash");
    let export = with(Some(&golden("tiny-dash/peft")), None, "dash_peft");
    let diff = max_abs_diff(&dash, &export);
    println!("Dash native vs PEFT export: max |diff| = {diff:.3e}");
    assert!(diff < 1e-3);
    assert!(max_abs_diff(&base, &dash) > 1e-3);
}

#[test]
fn cli_rejects_bad_inputs_clearly() {
    let d = tempfile::tempdir().unwrap();
    let model = golden("tiny-llama");
    let model = model.to_str().unwrap();
    let good = write_json(d.path(), "good.json", &arc_like(4, &[1, 2]));
    let good = good.to_str().unwrap();

    let bad = write_json(
        d.path(),
        "weird.json",
        &[rec("q", "answer1"), rec("q", "maybe")],
    );
    let e = run_cli(&["--model", model, "--data", bad.to_str().unwrap()]).unwrap_err();
    println!("unknown vocabulary: {e}");
    assert!(
        matches!(&e, Error::Record { index: 1, .. })
            && e.to_string().contains("weird.json")
            && e.to_string().contains("`maybe`"),
        "{e:?}"
    );

    let missing = d.path().join("nope.json");
    let e = run_cli(&["--model", model, "--data", missing.to_str().unwrap()]).unwrap_err();
    println!("missing file: {e}");
    assert!(
        matches!(&e, Error::Io { path, .. } if path == &missing),
        "{e:?}"
    );

    // An existing --out is refused before the model is even read.
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let e = run_cli(&[
        "--model",
        "no/such-model-dir",
        "--data",
        good,
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap_err();
    println!("existing out: {e}");
    assert!(matches!(&e, Error::OutputExists(p) if p == &out), "{e:?}");

    let e = run_cli(&[
        "--model",
        model,
        "--data",
        good,
        "--mode",
        "likelihood",
        "--num-beams",
        "4",
    ])
    .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let e = run_cli(&["--model", model, "--data", good, good]).unwrap_err();
    println!("duplicate: {e}");
    assert!(e.to_string().contains("distinct"), "{e}");
    let e = run_cli(&["--model", model, "--data", good, "--batch-size", "0"]).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    assert!(Cli::try_parse_from([
        "lora-dash",
        "eval",
        "--model",
        model,
        "--data",
        good,
        "--mode",
        "guess"
    ])
    .is_err());
    assert!(!d.path().join("out").join("results.json").exists());
}

/// SmolLM2 on the first 8 ARC-Easy test questions in both modes against transformers
/// (tests/golden/smollm2_eval_golden.json, from make_generate_golden.py --smollm2-dir):
/// identical greedy responses, likelihood sums within 1e-3. Runs when the model is present.
#[test]
fn smollm2_arc_easy_matches_transformers() {
    let (Some(gguf), Some(data)) = (require_smollm2(), require_shared_data()) else {
        return;
    };
    let want = read_json(&golden("smollm2_eval_golden.json"));
    let arc = data.join("commonsense/ARC-Easy/test.json");
    let d = tempfile::tempdir().unwrap();
    let base = [
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        arc.to_str().unwrap(),
        "--limit",
        "8",
    ];
    let g = check_run(&base, &d.path().join("g"), &[("ARC-Easy", 8)], "generate");
    for (p, w) in g.iter().zip(want["responses"].as_array().unwrap()) {
        assert_eq!(&p["raw"], w, "record {}", p["index"]);
    }
    let mut ll_args = base.to_vec();
    ll_args[5] = "4";
    ll_args.extend(["--mode", "likelihood"]);
    let l = check_run(
        &ll_args,
        &d.path().join("l"),
        &[("ARC-Easy", 4)],
        "likelihood",
    );
    let mut max_diff = 0f64;
    for (p, w) in l.iter().zip(want["likelihood"].as_array().unwrap()) {
        let (got, w) = (p["raw"].as_object().unwrap(), w.as_object().unwrap());
        assert_eq!(got.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
        for (k, v) in w {
            max_diff = max_diff.max((v.as_f64().unwrap() - got[k].as_f64().unwrap()).abs());
        }
    }
    println!("likelihood vs transformers: max |diff| = {max_diff:.3e}");
    assert!(max_diff < 1e-3);
}
