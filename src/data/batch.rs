//! Batching for causal-LM training: right-padding collation with labels shifted for
//! next-token prediction, a seeded train/validation split, and a loader whose position
//! (`LoaderState`) is saved in checkpoints so that a resumed run sees exactly the same batches.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::tokenize::{Example, Target, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// A padded batch. `labels[:, i]` is the target of position `i` (the next token), so the loss
/// is a plain cross-entropy over the `b * t` rows ignoring -100.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (b, t) u32
    pub input_ids: Tensor,
    /// (b, t) f32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// (b, t) u32 segment ids (0 on padding), for models that take them.
    pub token_type_ids: Option<Tensor>,
    /// Causal LM: (b, t) i64, shifted: `labels[:, i] = original[:, i + 1]`, last position and
    /// padding -100. Classification: (b,) i64 class ids. Regression: (b,) f32 scores.
    pub labels: Tensor,
    /// Non-padding tokens in the batch.
    pub n_tokens: usize,
    /// Positions with a target (labels != -100).
    pub n_target_tokens: usize,
}

impl Batch {
    pub fn batch_size(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.dims().get(1).copied().unwrap_or(0)
    }

    pub fn to_device(&self, dev: &Device) -> Result<Batch> {
        Ok(Batch {
            input_ids: self.input_ids.to_device(dev)?,
            attention_mask: self.attention_mask.to_device(dev)?,
            token_type_ids: match &self.token_type_ids {
                Some(t) => Some(t.to_device(dev)?),
                None => None,
            },
            labels: self.labels.to_device(dev)?,
            n_tokens: self.n_tokens,
            n_target_tokens: self.n_target_tokens,
        })
    }
}

/// Right-pads `examples` to the longest one (ids with `pad_id`). Causal-LM examples get
/// their labels padded with -100 and shifted by one position; sequence examples (with a
/// [`Target`]) get one label each and their segment ids. Tensors are on the host; move
/// them with [`Batch::to_device`].
pub fn collate(examples: &[&Example], pad_id: u32) -> Result<Batch> {
    let b = examples.len();
    let t = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    if b == 0 || t == 0 {
        return Err(Error::msg("cannot build a batch from no tokens"));
    }
    if examples.iter().any(|e| e.target.is_some()) {
        return collate_sequences(examples, pad_id, t);
    }
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let mut labels = vec![IGNORE_INDEX; b * t];
    let mut n_tokens = 0;
    for (r, ex) in examples.iter().enumerate() {
        if ex.labels.len() != ex.input_ids.len() {
            return Err(Error::msg(format!(
                "example {r} has {} ids but {} labels",
                ex.input_ids.len(),
                ex.labels.len()
            )));
        }
        let row = r * t;
        let n = ex.len();
        ids[row..row + n].copy_from_slice(&ex.input_ids);
        mask[row..row + n].fill(1.0);
        // Position i predicts token i + 1; the last real position has no target.
        if n > 1 {
            labels[row..row + n - 1].copy_from_slice(&ex.labels[1..]);
        }
        n_tokens += n;
    }
    let n_target_tokens = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let dev = crate::device::host();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &dev)?,
        attention_mask: Tensor::from_vec(mask, (b, t), &dev)?,
        token_type_ids: None,
        labels: Tensor::from_vec(labels, (b, t), &dev)?,
        n_tokens,
        n_target_tokens,
    })
}

/// Sequence classification / regression batch of width `t`.
fn collate_sequences(examples: &[&Example], pad_id: u32, t: usize) -> Result<Batch> {
    let b = examples.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let mut types = vec![0u32; b * t];
    let mut classes = Vec::with_capacity(b);
    let mut scores = Vec::with_capacity(b);
    let mut n_tokens = 0;
    for (r, ex) in examples.iter().enumerate() {
        let n = ex.len();
        let row = r * t;
        ids[row..row + n].copy_from_slice(&ex.input_ids);
        mask[row..row + n].fill(1.0);
        if !ex.token_type_ids.is_empty() {
            if ex.token_type_ids.len() != n {
                return Err(Error::msg(format!(
                    "example {r} has {n} ids but {} token type ids",
                    ex.token_type_ids.len()
                )));
            }
            types[row..row + n].copy_from_slice(&ex.token_type_ids);
        }
        match ex.target {
            Some(Target::Class(c)) => classes.push(c as i64),
            Some(Target::Score(x)) => scores.push(x),
            None => return Err(Error::msg(format!("example {r} has no label"))),
        }
        n_tokens += n;
    }
    let dev = crate::device::host();
    let labels = match (classes.len(), scores.len()) {
        (_, 0) => Tensor::from_vec(classes, b, &dev)?,
        (0, _) => Tensor::from_vec(scores, b, &dev)?,
        _ => return Err(Error::msg("a batch mixes class labels and scores")),
    };
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &dev)?,
        attention_mask: Tensor::from_vec(mask, (b, t), &dev)?,
        token_type_ids: Some(Tensor::from_vec(types, (b, t), &dev)?),
        labels,
        n_tokens,
        n_target_tokens: b,
    })
}

/// Splits off `val_set_size` items chosen by a seeded shuffle; both parts keep the input order.
/// `val_set_size == 0` gives an empty validation set.
pub fn split_train_val<T>(
    items: Vec<T>,
    val_set_size: usize,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>)> {
    let n = items.len();
    if val_set_size == 0 {
        return Ok((items, Vec::new()));
    }
    if val_set_size >= n {
        return Err(Error::config(
            "val_set_size",
            format!("{val_set_size} leaves no training examples out of {n}"),
        ));
    }
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed, "train_val_split").shuffle(&mut order);
    let mut is_val = vec![false; n];
    for &i in &order[..val_set_size] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (
        Vec::with_capacity(n - val_set_size),
        Vec::with_capacity(val_set_size),
    );
    for (item, v) in items.into_iter().zip(is_val) {
        if v {
            val.push(item);
        } else {
            train.push(item);
        }
    }
    Ok((train, val))
}

/// Where a [`Loader`] stands: the epoch and the offset of the next batch in that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: usize,
    pub cursor: usize,
}

/// Yields batches of example indices: a fresh seeded permutation per epoch, `batch_size` at a
/// time, the last batch of an epoch possibly shorter (as with PyTorch's `drop_last=False`).
/// The order of epoch `e` depends only on `(seed, e)` (and the example lengths when grouping
/// by length), so restoring a [`LoaderState`] reproduces the remaining batches exactly.
///
/// With [`Loader::group_by_length`], each epoch's permutation is cut into megabatches of
/// `min(n / (4·batch_size), 50)` batches, each megabatch sorted by length (longest first), as
/// transformers' `LengthGroupedSampler` does, and the resulting batches are then shuffled
/// (the short last batch stays last). Rows of a batch then have similar lengths, so little
/// of the batch is padding; which examples an epoch sees is unchanged.
#[derive(Debug, Clone)]
pub struct Loader {
    n: usize,
    batch_size: usize,
    seed: u64,
    /// Example lengths, when batches are grouped by length.
    lengths: Option<Vec<usize>>,
    state: LoaderState,
    order: Vec<usize>,
}

impl Loader {
    pub fn new(n_examples: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::resume(n_examples, batch_size, seed, LoaderState::default())
    }

    /// A loader positioned at `state` (saved by [`Loader::state`] with the same `n_examples`,
    /// `batch_size` and `seed`).
    pub fn resume(
        n_examples: usize,
        batch_size: usize,
        seed: u64,
        state: LoaderState,
    ) -> Result<Self> {
        if n_examples == 0 {
            return Err(Error::config("data", "no training examples"));
        }
        if batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if state.cursor >= n_examples {
            return Err(Error::config(
                "loader state",
                format!(
                    "cursor {} is past the {n_examples} examples; was the data changed?",
                    state.cursor
                ),
            ));
        }
        Ok(Loader {
            n: n_examples,
            batch_size,
            seed,
            lengths: None,
            state,
            order: epoch_order(n_examples, seed, state.epoch),
        })
    }

    /// Groups each epoch's batches by example length (`lengths[i]` is example `i`'s token
    /// count); see [`Loader`].
    pub fn group_by_length(mut self, lengths: Vec<usize>) -> Result<Self> {
        if lengths.len() != self.n {
            return Err(Error::msg(format!(
                "loader was built for {} examples, got {} lengths",
                self.n,
                lengths.len()
            )));
        }
        self.lengths = Some(lengths);
        self.order = self.order_of(self.state.epoch);
        Ok(self)
    }

    fn order_of(&self, epoch: usize) -> Vec<usize> {
        let order = epoch_order(self.n, self.seed, epoch);
        match &self.lengths {
            None => order,
            Some(len) => length_grouped(order, len, self.batch_size, self.seed, epoch),
        }
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches per epoch, counting a final short batch.
    pub fn steps_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch_size)
    }

    /// The example order of `epoch`.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        self.order_of(epoch)
    }

    /// The next batch's example indices; moves to the next epoch after the last batch.
    pub fn next_indices(&mut self) -> Vec<usize> {
        let start = self.state.cursor;
        let end = (start + self.batch_size).min(self.n);
        let out = self.order[start..end].to_vec();
        if end == self.n {
            self.state = LoaderState {
                epoch: self.state.epoch + 1,
                cursor: 0,
            };
            self.order = self.order_of(self.state.epoch);
        } else {
            self.state.cursor = end;
        }
        out
    }

    /// The next batch of `examples` (which must be the `n_examples` the loader was built for).
    pub fn next_batch(&mut self, examples: &[Example], pad_id: u32) -> Result<Batch> {
        if examples.len() != self.n {
            return Err(Error::msg(format!(
                "loader was built for {} examples, got {}",
                self.n,
                examples.len()
            )));
        }
        let idx = self.next_indices();
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        collate(&refs, pad_id)
    }
}

fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed, &format!("loader_epoch_{epoch}")).shuffle(&mut order);
    order
}

/// transformers' `get_length_grouped_indices` on the permutation `order`, then the batches
/// shuffled with a generator of their own (the last, possibly short, batch kept last).
fn length_grouped(
    order: Vec<usize>,
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<usize> {
    let n = order.len();
    let mult = (n / (batch_size * 4)).clamp(1, 50);
    let mut sorted = order;
    for mega in sorted.chunks_mut(mult * batch_size) {
        // Stable, so equal lengths keep the permutation's order.
        mega.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    }
    let mut batches: Vec<&[usize]> = sorted.chunks(batch_size).collect();
    let full = if n % batch_size == 0 {
        batches.len()
    } else {
        batches.len() - 1
    };
    Rng::derive(seed, &format!("length_groups_{epoch}")).shuffle(&mut batches[..full]);
    batches.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], labels: &[i64]) -> Example {
        Example::lm(ids.to_vec(), labels.to_vec())
    }

    #[test]
    fn collate_pads_and_shifts() {
        let a = ex(&[1, 5, 6, 7, 2], &[-100, -100, 6, 7, 2]);
        let b = ex(&[1, 8, 2], &[1, 8, 2]);
        let batch = collate(&[&a, &b], 0).unwrap();
        assert_eq!(batch.input_ids.dims(), &[2, 5]);
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 5, 6, 7, 2], vec![1, 8, 2, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.0; 5], vec![1.0, 1.0, 1.0, 0.0, 0.0]]
        );
        assert_eq!(
            batch.labels.to_vec2::<i64>().unwrap(),
            vec![vec![-100, 6, 7, 2, -100], vec![8, 2, -100, -100, -100]]
        );
        assert_eq!(batch.n_tokens, 8);
        assert_eq!(batch.n_target_tokens, 5);
        assert!(collate(&[], 0).is_err());
        assert!(collate(&[&ex(&[1, 2], &[1])], 0).is_err());
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let items: Vec<usize> = (0..100).collect();
        let (t1, v1) = split_train_val(items.clone(), 10, 42).unwrap();
        let (t2, v2) = split_train_val(items.clone(), 10, 42).unwrap();
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!((t1.len(), v1.len()), (90, 10));
        let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
        all.sort();
        assert_eq!(all, items);
        assert!(
            t1.windows(2).all(|w| w[0] < w[1]),
            "train keeps input order"
        );
        let (_, v3) = split_train_val(items.clone(), 10, 43).unwrap();
        assert_ne!(v1, v3);
        assert_eq!(split_train_val(items.clone(), 0, 1).unwrap().0, items);
        assert!(matches!(
            split_train_val(items, 100, 1),
            Err(Error::InvalidConfig { .. })
        ));
    }

    #[test]
    fn loader_covers_epochs_and_resumes_exactly() {
        let mut l = Loader::new(10, 4, 7).unwrap();
        assert_eq!(l.steps_per_epoch(), 3);
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        for _ in 0..3 {
            let b = l.next_indices();
            sizes.push(b.len());
            seen.extend(b);
        }
        assert_eq!(sizes, vec![4, 4, 2]);
        assert_eq!(
            l.state(),
            LoaderState {
                epoch: 1,
                cursor: 0
            }
        );
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(
            l.epoch_order(0),
            l.epoch_order(1),
            "each epoch is reshuffled"
        );

        // Run 7 batches straight, versus 4 then a save/restore (through JSON) then 3.
        let mut straight = Loader::new(10, 4, 7).unwrap();
        let all: Vec<Vec<usize>> = (0..7).map(|_| straight.next_indices()).collect();
        let mut first = Loader::new(10, 4, 7).unwrap();
        let mut resumed_run: Vec<Vec<usize>> = (0..4).map(|_| first.next_indices()).collect();
        let saved = serde_json::to_string(&first.state()).unwrap();
        let state: LoaderState = serde_json::from_str(&saved).unwrap();
        assert_eq!(
            state,
            LoaderState {
                epoch: 1,
                cursor: 4
            }
        );
        let mut second = Loader::resume(10, 4, 7, state).unwrap();
        resumed_run.extend((0..3).map(|_| second.next_indices()));
        assert_eq!(all, resumed_run);

        assert!(Loader::resume(
            10,
            4,
            7,
            LoaderState {
                epoch: 0,
                cursor: 10
            }
        )
        .is_err());
        assert!(Loader::new(0, 4, 7).is_err());
        assert!(Loader::new(10, 0, 7).is_err());

        let examples: Vec<Example> = (0..10)
            .map(|i| ex(&[1, i + 3], &[1, i as i64 + 3]))
            .collect();
        let mut l = Loader::new(10, 4, 7).unwrap();
        let order = l.epoch_order(0);
        let b = l.next_batch(&examples, 0).unwrap();
        let col: Vec<u32> = b
            .input_ids
            .to_vec2::<u32>()
            .unwrap()
            .iter()
            .map(|r| r[1])
            .collect();
        assert_eq!(
            col,
            order[..4].iter().map(|&i| i as u32 + 3).collect::<Vec<_>>()
        );
    }

    #[test]
    fn group_by_length_cuts_padding_and_resumes_exactly() {
        // 203 examples (a short last batch) with lengths 1..=203 in a scrambled order.
        let n = 203;
        let lengths: Vec<usize> = (0..n).map(|i| (i * 37) % n + 1).collect();
        let padded = |l: &mut Loader| -> (usize, Vec<usize>, usize) {
            let (mut pad, mut seen, mut last) = (0, Vec::new(), 0);
            for _ in 0..l.steps_per_epoch() {
                let b = l.next_indices();
                last = b.len();
                let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
                pad += b.iter().map(|&i| longest - lengths[i]).sum::<usize>();
                seen.extend(b);
            }
            (pad, seen, last)
        };
        let mut plain = Loader::new(n, 8, 3).unwrap();
        let mut grouped = Loader::new(n, 8, 3)
            .unwrap()
            .group_by_length(lengths.clone())
            .unwrap();
        let (pad_plain, _, _) = padded(&mut plain);
        let (pad_grouped, seen, last) = padded(&mut grouped);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..n).collect::<Vec<_>>(),
            "every example once per epoch"
        );
        // Megabatches of min(203 / 32, 50) = 6 batches (48 examples) sorted by length: within
        // one, neighbours differ by about 203 / 48 ≈ 4, so the 8 rows of a batch span ~30
        // and pad ~8·15 tokens; a random batch pads ~8·(203·8/9 − 102) ≈ 8·78.
        println!("padding: plain {pad_plain}, grouped {pad_grouped}");
        assert!(pad_grouped * 3 < pad_plain, "{pad_grouped} vs {pad_plain}");
        assert_eq!(last, n % 8, "the short batch comes last");
        assert_eq!(grouped.state().epoch, 1);
        let e1 = grouped.epoch_order(1);
        assert_ne!(seen, e1, "each epoch is regrouped");
        // The same batches again from a resumed loader.
        let mut a = Loader::new(n, 8, 3)
            .unwrap()
            .group_by_length(lengths.clone())
            .unwrap();
        let all: Vec<Vec<usize>> = (0..40).map(|_| a.next_indices()).collect();
        let mut b = Loader::new(n, 8, 3)
            .unwrap()
            .group_by_length(lengths.clone())
            .unwrap();
        let mut resumed: Vec<Vec<usize>> = (0..30).map(|_| b.next_indices()).collect();
        let mut c = Loader::resume(n, 8, 3, b.state())
            .unwrap()
            .group_by_length(lengths.clone())
            .unwrap();
        resumed.extend((0..10).map(|_| c.next_indices()));
        assert_eq!(all, resumed);
        assert!(Loader::new(n, 8, 3)
            .unwrap()
            .group_by_length(vec![1; 5])
            .is_err());
    }
}
