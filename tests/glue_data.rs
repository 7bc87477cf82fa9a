//! GLUE files read in their original layouts: the real CoLA, RTE, SST-2 and QNLI files of the
//! shared data directory (row counts from its README; label counts and quote counts from
//! `awk`/`grep` over the same files, commands in the comments), and hand-written fixtures in
//! the documented MRPC, STS-B, QQP and MNLI layouts (`tests/fixtures/glue/`).

use std::path::{Path, PathBuf};

use lora_dash::data::glue::{read_glue_tsv, GlueFile, GlueLabel, GlueTask};
use lora_dash::eval::glue_metrics::glue_metrics;

/// The shared GLUE directory: `$LORA_DASH_DATA/glue`, else `../shared/data/glue` beside the
/// crate. Missing data fails the test when `CI=true`; elsewhere the test says why it skips.
fn glue_dir_or_skip() -> Option<PathBuf> {
    let root = std::env::var_os("LORA_DASH_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    let dir = root.join("glue");
    if dir.is_dir() {
        return Some(dir);
    }
    let why = format!(
        "GLUE data not found at {} (set LORA_DASH_DATA to the shared data directory)",
        dir.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    println!("skipping: {why}");
    None
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/glue")
        .join(name)
}

fn read(task: GlueTask, path: &Path) -> GlueFile {
    read_glue_tsv(task, path).unwrap_or_else(|e| panic!("{e}"))
}

fn class_counts(file: &GlueFile, n: usize) -> Vec<usize> {
    let mut counts = vec![0; n];
    for r in &file.rows {
        match r.label {
            Some(GlueLabel::Class(c)) => counts[c] += 1,
            other => panic!("line {}: label {other:?}", r.line),
        }
    }
    counts
}

/// Rows whose text holds a `"`, to compare with `grep -c '"'` (no header holds one).
fn rows_with_quotes(file: &GlueFile) -> usize {
    let has = |s: &str| s.contains('"');
    file.rows
        .iter()
        .filter(|r| has(&r.text_a) || r.text_b.as_deref().is_some_and(has))
        .count()
}

/// Indices and line numbers follow the file: no row skipped, `header` lines before the data.
fn assert_positions(file: &GlueFile, header: usize) {
    for (i, r) in file.rows.iter().enumerate() {
        assert_eq!((r.index, r.line), (i, i + 1 + header));
    }
}

#[test]
fn cola_files() {
    let Some(dir) = glue_dir_or_skip() else {
        return;
    };
    let cola = dir.join("cola");
    let train = read(GlueTask::Cola, &cola.join("in_domain_train.tsv"));
    assert_eq!(train.rows.len(), 8551);
    assert_positions(&train, 0);
    let first = &train.rows[0];
    assert_eq!(
        first.text_a,
        "Our friends won't buy this analysis, let alone the next one we propose."
    );
    assert_eq!(first.label, Some(GlueLabel::Class(1)));
    assert_eq!(first.text_b, None);
    assert_eq!(
        read(GlueTask::Cola, &cola.join("glue_layout/train.tsv")),
        train
    );

    // glue_layout/dev.tsv is in_domain_dev.tsv followed by out_of_domain_dev.tsv, the last
    // line without a newline.
    let in_dev = read(GlueTask::Cola, &cola.join("in_domain_dev.tsv"));
    let out_dev = read(GlueTask::Cola, &cola.join("out_of_domain_dev.tsv"));
    let dev = read(GlueTask::Cola, &cola.join("glue_layout/dev.tsv"));
    assert_eq!((in_dev.rows.len(), out_dev.rows.len()), (527, 516));
    assert_eq!(dev.rows.len(), 1043);
    assert_positions(&dev, 0);
    let texts = |f: &GlueFile| f.rows.iter().map(|r| r.text_a.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&dev), [texts(&in_dev), texts(&out_dev)].concat());
    assert_eq!(dev.rows[1042].text_a, "John talked to Bill about himself.");
    // awk -F'\t' '{c[$2]++} END {for (k in c) print k, c[k]}' cola/glue_layout/dev.tsv
    assert_eq!(class_counts(&dev, 2), [324, 719]);
}

#[test]
fn rte_files() {
    let Some(dir) = glue_dir_or_skip() else {
        return;
    };
    let rte = dir.join("rte");
    let train = read(GlueTask::Rte, &rte.join("train.tsv"));
    assert_eq!(train.rows.len(), 2490);
    assert_positions(&train, 1);
    let r = &train.rows[0];
    assert_eq!(
        r.text_a,
        "No Weapons of Mass Destruction Found in Iraq Yet."
    );
    assert_eq!(
        r.text_b.as_deref(),
        Some("Weapons of Mass Destruction Found in Iraq.")
    );
    assert_eq!(r.label, Some(GlueLabel::Class(1))); // not_entailment
    assert_eq!(train.rows[1].label, Some(GlueLabel::Class(0))); // entailment
                                                                // grep -c '"' rte/train.tsv
    assert_eq!(rows_with_quotes(&train), 454);

    let dev = read(GlueTask::Rte, &rte.join("dev.tsv"));
    assert_eq!(dev.rows.len(), 277);
    // awk -F'\t' 'NR > 1 {c[$NF]++} END {for (k in c) print k, c[k]}' rte/dev.tsv
    assert_eq!(class_counts(&dev, 2), [146, 131]);
    assert_eq!(rows_with_quotes(&dev), 48); // grep -c '"' rte/dev.tsv

    let test_path = rte.join("test.tsv");
    let test = read(GlueTask::Rte, &test_path);
    assert_eq!(test.rows.len(), 3000);
    assert_eq!(rows_with_quotes(&test), 504); // grep -c '"' rte/test.tsv
    assert!(test.rows.iter().all(|r| r.label.is_none()));
    assert_eq!(
        test.rows[0].text_b.as_deref(),
        Some("Shukla is related to Mangla.")
    );
    let e = test.labels(&test_path).unwrap_err().to_string();
    assert!(e.contains("test.tsv: line 2: no label"), "{e}");
    assert!(
        e.contains("training and evaluation need a labelled file"),
        "{e}"
    );
}

#[test]
fn sst2_and_qnli_files() {
    let Some(dir) = glue_dir_or_skip() else {
        return;
    };
    let train = read(GlueTask::Sst2, &dir.join("sst2/train.tsv"));
    assert_eq!(train.rows.len(), 67349);
    assert_positions(&train, 1);
    // The file keeps a space before the tab; so does the text.
    assert_eq!(
        train.rows[0].text_a,
        "hide new secretions from the parental units "
    );
    assert_eq!(train.rows[0].label, Some(GlueLabel::Class(0)));
    let dev = read(GlueTask::Sst2, &dir.join("sst2/dev.tsv"));
    assert_eq!(dev.rows.len(), 872);
    // awk -F'\t' 'NR > 1 {c[$2]++} END {for (k in c) print k, c[k]}' sst2/dev.tsv
    assert_eq!(class_counts(&dev, 2), [428, 444]);
    let test = read(GlueTask::Sst2, &dir.join("sst2/test.tsv"));
    assert_eq!(test.rows.len(), 1821);
    assert_eq!(
        test.rows[0].text_a,
        "uneasy mishmash of styles and genres ."
    );
    assert!(!test.has_labels());

    let qnli = read(GlueTask::Qnli, &dir.join("qnli/dev.tsv"));
    assert_eq!(qnli.rows.len(), 5463);
    assert_positions(&qnli, 1);
    let r = &qnli.rows[0];
    assert_eq!(
        r.text_a,
        "What came into force after the new constitution was herald?"
    );
    assert_eq!(
        r.text_b.as_deref(),
        Some("As of that day, the new constitution heralding the Second Republic came into force.")
    );
    assert_eq!(r.label, Some(GlueLabel::Class(0)));
    // awk -F'\t' 'NR > 1 {c[$NF]++} END {for (k in c) print k, c[k]}' qnli/dev.tsv
    assert_eq!(class_counts(&qnli, 2), [2702, 2761]);
    assert_eq!(rows_with_quotes(&qnli), 606); // grep -c '"' qnli/dev.tsv

    // Gold labels as their own predictions: accuracy 1.
    let labels = qnli.labels(&dir.join("qnli/dev.tsv")).unwrap();
    let m = glue_metrics(GlueTask::Qnli, &labels, &labels).unwrap();
    assert_eq!(m[GlueTask::Qnli.main_metric()], 1.0);
}

#[test]
fn files_of_another_task_are_refused_with_file_and_line() {
    let Some(dir) = glue_dir_or_skip() else {
        return;
    };
    let cases = [
        (
            GlueTask::Rte,
            dir.join("sst2/train.tsv"),
            "line 1: header `sentence, label` is not a rte file's",
        ),
        (
            GlueTask::Mrpc,
            dir.join("cola/in_domain_train.tsv"),
            "line 1: header `gj04, 1, , Our friends",
        ),
        (
            GlueTask::Qnli,
            dir.join("rte/dev.tsv"),
            "line 1: header `index, sentence1, sentence2, label` is not a qnli file's",
        ),
        (
            GlueTask::Rte,
            dir.join("qnli/dev.tsv"),
            "line 1: header `index, question, sentence, label` is not a rte file's",
        ),
        // CoLA's train and dev files have no header, so another task's header is data.
        (
            GlueTask::Cola,
            dir.join("rte/train.tsv"),
            "line 1: label `sentence1` is not 0 or 1",
        ),
        (
            GlueTask::Cola,
            dir.join("sst2/dev.tsv"),
            "line 1: expected 4 tab-separated fields",
        ),
        (
            GlueTask::Sst2,
            dir.join("cola/in_domain_dev.tsv"),
            "line 1: header `gj04",
        ),
        (
            GlueTask::Mnli,
            dir.join("rte/dev.tsv"),
            "line 1: header `index, sentence1",
        ),
        (
            GlueTask::Rte,
            fixture("mnli_train.tsv"),
            "line 1: header `index, promptID",
        ),
        (
            GlueTask::Qqp,
            fixture("mrpc_train.tsv"),
            "line 1: header `Quality, #1 ID",
        ),
        (
            GlueTask::Mrpc,
            fixture("qqp_train.tsv"),
            "line 1: header `id, qid1",
        ),
        (
            GlueTask::Stsb,
            fixture("mnli_dev_matched.tsv"),
            "line 1: header `index, promptID",
        ),
    ];
    for (task, path, want) in cases {
        let e = read_glue_tsv(task, &path).unwrap_err().to_string();
        let expected = format!("{}: {want}", path.display());
        assert!(e.starts_with(&expected), "{task}: got {e}\nwant {expected}");
    }
}

#[test]
fn mrpc_fixtures_with_bom_crlf_and_quotes() {
    let train = read(GlueTask::Mrpc, &fixture("mrpc_train.tsv"));
    assert_eq!(train.rows.len(), 6);
    assert_positions(&train, 1);
    let r = &train.rows[0];
    assert_eq!(r.label, Some(GlueLabel::Class(1)));
    assert_eq!(
        r.text_a,
        "The mayor called the plan \" a bold step \" , aides said ."
    );
    assert_eq!(
        r.text_b.as_deref(),
        Some("Aides said the mayor had called the plan \" a bold step \" .")
    );
    // An unbalanced `"` is text too, and the CR of the CRLF is not.
    assert_eq!(
        train.rows[2].text_b.as_deref(),
        Some("In March the band put out a 12\" single .")
    );
    assert_eq!(class_counts(&train, 2), [2, 4]);
    let test = read(GlueTask::Mrpc, &fixture("mrpc_test.tsv"));
    assert_eq!(test.rows.len(), 5);
    assert!(!test.has_labels());
    assert_eq!(
        test.rows[4].text_b.as_deref(),
        Some("No officials would comment on the report .")
    );
}

#[test]
fn stsb_fixture_scores() {
    let dev = read(GlueTask::Stsb, &fixture("stsb_dev.tsv"));
    let scores: Vec<f32> = dev
        .rows
        .iter()
        .map(|r| r.label.unwrap().score().unwrap())
        .collect();
    assert_eq!(scores, [5.0, 4.75, 5.0, 3.8, 1.5, 0.0]);
    assert_eq!(
        dev.rows[3].text_a,
        "Officials say \"no injuries\" after blast"
    );
    assert_eq!(
        dev.rows[3].text_b.as_deref(),
        Some("Blast at plant, no injuries reported")
    );

    // A score that is not a number names the file and line.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("dev.tsv");
    let text = std::fs::read_to_string(fixture("stsb_dev.tsv")).unwrap();
    std::fs::write(&bad, text.replace("\t1.5\n", "\tabout 1.5\n")).unwrap();
    let e = read_glue_tsv(GlueTask::Stsb, &bad).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: line 6: score `about 1.5` is not a number",
            bad.display()
        )
    );
}

#[test]
fn qqp_fixture_skips_the_broken_record() {
    let train = read(GlueTask::Qqp, &fixture("qqp_train.tsv"));
    // The record with a line break in its second question is two malformed lines (5 and 6).
    assert_eq!(train.skipped, 2);
    assert_eq!(train.rows.len(), 6);
    let at: Vec<(usize, usize)> = train.rows.iter().map(|r| (r.index, r.line)).collect();
    assert_eq!(at, [(0, 2), (1, 3), (2, 4), (5, 7), (6, 8), (7, 9)]);
    assert_eq!(
        train.rows[2].text_a,
        "What does \"hello world\" mean in programming?"
    );
    assert_eq!(train.rows[5].text_a, "Is 6\" too short for a phone?");
    assert_eq!(class_counts(&train, 2), [3, 3]);
}

#[test]
fn mnli_fixtures_in_train_and_both_dev_layouts() {
    let entail = GlueLabel::Class(0);
    let (neutral, contra) = (GlueLabel::Class(1), GlueLabel::Class(2));
    let labels = |f: &GlueFile| f.rows.iter().map(|r| r.label.unwrap()).collect::<Vec<_>>();
    let train = read(GlueTask::Mnli, &fixture("mnli_train.tsv"));
    assert_eq!(labels(&train), [neutral, entail, contra, entail, contra]);
    assert_eq!(
        train.rows[0].text_a,
        "Conceptually cream skimming has two basic dimensions - product and geography."
    );
    assert_eq!(
        train.rows[0].text_b.as_deref(),
        Some("Product and geography are what make cream skimming work.")
    );
    assert_eq!(train.rows[2].text_a, "He said \"stay here\" and left.");
    // dev: the gold label is the last of 16 columns, after label1..label5 (row 0's label1 is
    // `neutral`, label2 `entailment`; row 3's label3 is `neutral`).
    let matched = read(GlueTask::Mnli, &fixture("mnli_dev_matched.tsv"));
    assert_eq!(labels(&matched), [neutral, entail, contra, entail, contra]);
    assert_eq!(matched.rows[2].text_a, "She whispered, \"not yet.\"");
    let mismatched = read(GlueTask::Mnli, &fixture("mnli_dev_mismatched.tsv"));
    assert_eq!(
        labels(&mismatched),
        [contra, entail, neutral, contra, entail]
    );
    assert_eq!(
        mismatched.rows[1].text_a,
        "The term \"neutral\" is used loosely here."
    );
    let m = glue_metrics(GlueTask::Mnli, &labels(&matched), &labels(&mismatched)).unwrap();
    // matched [n, e, c, e, c] against mismatched [c, e, n, c, e]: equal only at position 1,
    // accuracy 1/5.
    assert_eq!(m["accuracy"], 0.2);
}
