//! The column layouts of each GLUE task's files: train/dev (with labels) and test (without),
//! as the GLUE distribution ships them and the shared data README documents them.

use super::GlueTask;

/// One column layout of a task's files.
pub(super) struct Layout {
    /// Which files have it.
    pub kind: &'static str,
    /// Column names; the header row must hold exactly these (case ignored).
    pub columns: &'static [&'static str],
    /// False for CoLA's train and dev files, whose first line is already data.
    pub header_row: bool,
    pub text_a: usize,
    pub text_b: Option<usize>,
    pub label: Option<usize>,
}

const fn labelled(
    columns: &'static [&'static str],
    text_a: usize,
    text_b: Option<usize>,
    label: usize,
) -> Layout {
    Layout {
        kind: "train/dev",
        columns,
        header_row: true,
        text_a,
        text_b,
        label: Some(label),
    }
}

const fn test(columns: &'static [&'static str], text_a: usize, text_b: Option<usize>) -> Layout {
    Layout {
        kind: "test",
        columns,
        header_row: true,
        text_a,
        text_b,
        label: None,
    }
}

const COLA: &[Layout] = &[
    test(&["index", "sentence"], 1, None),
    Layout {
        kind: "train/dev, no header",
        columns: &["source", "label", "original_mark", "sentence"],
        header_row: false,
        text_a: 3,
        text_b: None,
        label: Some(1),
    },
];
const SST2: &[Layout] = &[
    labelled(&["sentence", "label"], 0, None, 1),
    test(&["index", "sentence"], 1, None),
];
const MRPC: &[Layout] = &[
    labelled(
        &["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        3,
        Some(4),
        0,
    ),
    test(
        &["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        3,
        Some(4),
    ),
];
const QQP: &[Layout] = &[
    labelled(
        &[
            "id",
            "qid1",
            "qid2",
            "question1",
            "question2",
            "is_duplicate",
        ],
        3,
        Some(4),
        5,
    ),
    test(&["id", "question1", "question2"], 1, Some(2)),
];
pub(super) const STSB_COLUMNS: [&str; 10] = [
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
    "score",
];
const STSB: &[Layout] = &[
    labelled(&STSB_COLUMNS, 7, Some(8), 9),
    test(STSB_COLUMNS.split_at(9).0, 7, Some(8)),
];
const MNLI_COLUMNS: [&str; 16] = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "label2",
    "label3",
    "label4",
    "label5",
    "gold_label",
];
pub(super) const MNLI_TRAIN_COLUMNS: [&str; 12] = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
];
const MNLI: &[Layout] = &[
    Layout {
        kind: "train",
        ..labelled(&MNLI_TRAIN_COLUMNS, 8, Some(9), 11)
    },
    Layout {
        kind: "dev_matched/dev_mismatched",
        ..labelled(&MNLI_COLUMNS, 8, Some(9), 15)
    },
    test(MNLI_COLUMNS.split_at(10).0, 8, Some(9)),
];
const QNLI: &[Layout] = &[
    labelled(&["index", "question", "sentence", "label"], 1, Some(2), 3),
    test(&["index", "question", "sentence"], 1, Some(2)),
];
const RTE: &[Layout] = &[
    labelled(&["index", "sentence1", "sentence2", "label"], 1, Some(2), 3),
    test(&["index", "sentence1", "sentence2"], 1, Some(2)),
];

pub(super) fn layouts(task: GlueTask) -> &'static [Layout] {
    match task {
        GlueTask::Cola => COLA,
        GlueTask::Sst2 => SST2,
        GlueTask::Mrpc => MRPC,
        GlueTask::Qqp => QQP,
        GlueTask::Stsb => STSB,
        GlueTask::Mnli => MNLI,
        GlueTask::Qnli => QNLI,
        GlueTask::Rte => RTE,
    }
}

/// The task's layouts for an error message.
pub(super) fn describe(layouts: &[Layout]) -> String {
    let parts: Vec<String> = layouts
        .iter()
        .map(|l| format!("`{}` ({})", l.columns.join(", "), l.kind))
        .collect();
    parts.join(" or ")
}
