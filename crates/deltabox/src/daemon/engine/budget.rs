//! The template memory budget: the in-memory copies (templates) of process checkpoints give fast rollbacks
//! and cost memory, so they are kept while they fit — per sandbox (its `template_memory`) and for the
//! whole daemon (`deltabox serve --template-memory`) — and dropped least recently used first (a checkpoint
//! rolled back to then restores from its image). See docs/deltacr.md, "Template memory budget".
//!
//! Each sandbox's shim measures what its templates hold and when each checkpoint was last used, and
//! reports it in its `Info` answer. Every [`POLL_EVERY`] the daemon asks every shim, adds the forks it
//! saw (a use no shim sees), chooses what to drop with [`to_drop`] and asks the shims that keep those
//! templates to drop them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deltafs::StackId;

use super::Engine;
use crate::catalog::{CheckpointKind, CheckpointRecord};
use crate::shim::proto::{monotonic_ns, KeptTemplates};

/// How often the daemon learns what the sandboxes' templates hold and enforces the budgets.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How long a shim's report is waited for.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A process checkpoint whose templates a sandbox keeps, as the budgets weigh it.
#[derive(Debug, Clone, PartialEq)]
pub struct Held<'a> {
    pub sandbox: &'a str,
    /// What its templates hold.
    pub bytes: u64,
    /// When it was last used (taken, rolled back to or forked), on one clock for all.
    pub used_ns: u64,
    /// Whether it may be dropped (its image is written, and no image being written needs it).
    pub droppable: bool,
}

/// The checkpoints (indices into `held`) whose templates to drop so that what each sandbox keeps fits
/// its budget, then what all of them keep fits the daemon's: least recently used first, until the rest
/// fits. One that is not droppable is never chosen, but what it holds counts.
pub fn to_drop(held: &[Held<'_>], sandbox_budget: impl Fn(&str) -> u64, daemon_budget: u64) -> Vec<usize> {
    let mut by_sandbox: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, h) in held.iter().enumerate() {
        by_sandbox.entry(h.sandbox).or_default().push(i);
    }
    let mut dropped = vec![false; held.len()];
    for (sandbox, kept) in by_sandbox {
        for i in least_recently_used_over(held, &kept, sandbox_budget(sandbox)) {
            dropped[i] = true;
        }
    }
    let kept: Vec<usize> = (0..held.len()).filter(|&i| !dropped[i]).collect();
    for i in least_recently_used_over(held, &kept, daemon_budget) {
        dropped[i] = true;
    }
    (0..held.len()).filter(|&i| dropped[i]).collect()
}

/// Of `kept` (indices into `held`), the droppable ones to drop, least recently used first, until what
/// remains holds at most `budget`; a zero budget keeps none (also those holding nothing: a checkpoint
/// without processes).
fn least_recently_used_over(held: &[Held<'_>], kept: &[usize], budget: u64) -> Vec<usize> {
    let mut total: u64 = kept.iter().map(|&i| held[i].bytes).sum();
    let mut candidates: Vec<usize> = kept.iter().copied().filter(|&i| held[i].droppable).collect();
    candidates.sort_by_key(|&i| held[i].used_ns);
    let mut chosen = Vec::new();
    for i in candidates {
        if budget > 0 && total <= budget {
            break;
        }
        total -= held[i].bytes;
        chosen.push(i);
    }
    chosen
}

/// What the daemon knows of the sandboxes' templates.
pub struct TemplateMemory {
    /// Most memory the templates of all sandboxes may hold together.
    pub budget: u64,
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// What each sandbox's shim last reported, by sandbox id.
    kept: HashMap<String, Vec<KeptTemplates>>,
    /// When each checkpoint (by stack) was last forked (`monotonic_ns`).
    forked: HashMap<StackId, u64>,
}

impl TemplateMemory {
    pub fn new(budget: u64) -> TemplateMemory {
        TemplateMemory { budget, known: Mutex::new(Known::default()) }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().expect("template memory lock")
    }

    /// Full checkpoint `cp` was just taken: its sandbox keeps its templates, not measured yet (until the
    /// sandbox's next report says more).
    pub fn taken(&self, cp: &CheckpointRecord) {
        let kept = KeptTemplates { stack: cp.stack, memory_bytes: None, used_ns: monotonic_ns(), droppable: false };
        self.known().kept.entry(cp.sandbox.clone()).or_default().push(kept);
    }

    /// Checkpoint `cp` was forked: a use, as much as a rollback to it.
    pub fn forked(&self, cp: &CheckpointRecord) {
        self.known().forked.insert(cp.stack, monotonic_ns());
    }

    /// What the templates of checkpoint `cp` hold as last reported: None for a filesystem checkpoint (it
    /// has none) and until they are first measured, 0 once they are dropped (or its sandbox is gone).
    pub fn of(&self, cp: &CheckpointRecord) -> Option<u64> {
        if cp.kind != CheckpointKind::Full {
            return None;
        }
        let known = self.known();
        let kept = known.kept.get(&cp.sandbox).and_then(|list| list.iter().find(|k| k.stack == cp.stack));
        kept.map_or(Some(0), |k| k.memory_bytes)
    }

    /// What the templates of all sandboxes hold, as last reported.
    pub fn total(&self) -> u64 {
        self.known().kept.values().flatten().filter_map(|k| k.memory_bytes).sum()
    }
}

impl Engine {
    /// Enforces the template memory budgets every [`POLL_EVERY`] while the daemon runs.
    pub(super) fn watch_template_memory(self: &Arc<Self>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(POLL_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(engine) = engine.upgrade() else { return };
                engine.enforce_template_memory().await;
            }
        });
    }

    /// Learns what every sandbox's templates hold and has the ones over the budgets dropped.
    async fn enforce_template_memory(&self) {
        let sandboxes: Vec<(String, u64)> = self
            .sandboxes
            .read()
            .await
            .values()
            .filter(|live| live.compatible())
            .map(|live| (live.record.id.clone(), live.record.config.template_memory.unwrap_or(u64::MAX)))
            .collect();
        // A shim that does not answer soon holds up no other sandbox's budget for long.
        let asks = sandboxes
            .iter()
            .map(|(id, _)| async move { tokio::time::timeout(ANSWER_WITHIN, self.shim(id).info()).await });
        let answers = futures_util::future::join_all(asks).await;
        let reports = sandboxes.into_iter().zip(answers).filter_map(|((id, budget), answer)| match answer {
            Ok(Ok(info)) => Some((id, budget, info.templates)),
            // Gone meanwhile, or busy: asked again next time.
            Ok(Err(e)) => {
                tracing::debug!(sandbox = %id, "no template report: {e}");
                None
            }
            Err(_) => {
                tracing::debug!(sandbox = %id, "no template report within {ANSWER_WITHIN:?}");
                None
            }
        });
        for (sandbox, stack) in self.template_memory.learn(reports.collect()) {
            if let Err(e) = self.shim(&sandbox).drop_templates(stack).await {
                tracing::warn!(%sandbox, %stack, "cannot drop a checkpoint's templates: {e}");
            }
        }
    }
}

impl TemplateMemory {
    /// Takes in what each sandbox reported (its id, budget and templates) and returns the checkpoints
    /// whose templates to drop (sandbox, stack), which count as dropped from now on.
    fn learn(&self, reports: Vec<(String, u64, Vec<KeptTemplates>)>) -> Vec<(String, StackId)> {
        let budgets: HashMap<String, u64> = reports.iter().map(|(id, budget, _)| (id.clone(), *budget)).collect();
        let mut known = self.known();
        let Known { kept, forked } = &mut *known;
        *kept = reports.into_iter().map(|(id, _, templates)| (id, templates)).collect();
        forked.retain(|stack, _| kept.values().flatten().any(|k| k.stack == *stack));
        let entries: Vec<(&str, &KeptTemplates)> =
            kept.iter().flat_map(|(id, list)| list.iter().map(move |k| (id.as_str(), k))).collect();
        let held: Vec<Held<'_>> = entries
            .iter()
            .map(|(sandbox, k)| Held {
                sandbox,
                bytes: k.memory_bytes.unwrap_or(0),
                used_ns: k.used_ns.max(forked.get(&k.stack).copied().unwrap_or(0)),
                droppable: k.droppable,
            })
            .collect();
        let drops: Vec<(String, StackId)> = to_drop(&held, |sandbox| budgets[sandbox], self.budget)
            .into_iter()
            .map(|i| (entries[i].0.to_string(), entries[i].1.stack))
            .collect();
        for (sandbox, stack) in &drops {
            if let Some(list) = kept.get_mut(sandbox) {
                list.retain(|k| k.stack != *stack);
            }
        }
        drops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(sandbox: &str, mib: u64, used_ns: u64) -> Held<'_> {
        Held { sandbox, bytes: mib << 20, used_ns, droppable: true }
    }

    fn unlimited(_: &str) -> u64 {
        u64::MAX
    }

    #[test]
    fn nothing_is_dropped_while_all_fits() {
        let all = [held("a", 10, 1), held("a", 10, 2), held("b", 10, 3)];
        assert!(to_drop(&all, |_| 20 << 20, 30 << 20).is_empty());
    }

    #[test]
    fn a_sandbox_over_its_budget_drops_its_least_recently_used_first() {
        // Used in the order 2, 0, 3, 1: dropping 2 and 0 leaves 20 MiB.
        let all = [held("a", 10, 20), held("a", 10, 40), held("a", 10, 10), held("a", 10, 30)];
        assert_eq!(to_drop(&all, |_| 25 << 20, u64::MAX), [0, 2]);
        // Another sandbox's budget is its own.
        let all = [held("a", 10, 1), held("b", 30, 2)];
        assert_eq!(to_drop(&all, |s| if s == "a" { 5 << 20 } else { u64::MAX }, u64::MAX), [0]);
    }

    #[test]
    fn the_daemon_s_budget_drops_the_least_recently_used_of_all_sandboxes() {
        let all = [held("a", 10, 1), held("b", 10, 4), held("a", 10, 3), held("b", 10, 2)];
        assert_eq!(to_drop(&all, unlimited, 20 << 20), [0, 3]);
    }

    #[test]
    fn what_a_sandbox_dropped_for_its_own_budget_counts_no_more_for_the_daemon_s() {
        // a drops its oldest (10 MiB) for its 15 MiB budget; the 25 MiB left fit the daemon's 25 MiB.
        let all = [held("a", 10, 1), held("a", 10, 5), held("b", 15, 2)];
        assert_eq!(to_drop(&all, |s| if s == "a" { 15 << 20 } else { u64::MAX }, 25 << 20), [0]);
    }

    #[test]
    fn one_that_cannot_be_dropped_stays_and_counts() {
        let pinned = Held { droppable: false, ..held("a", 30, 1) };
        let all = [pinned, held("a", 10, 2), held("a", 10, 3)];
        assert_eq!(to_drop(&all, |_| 35 << 20, u64::MAX), [1, 2], "the pinned one alone is over");
    }

    #[test]
    fn a_zero_budget_drops_every_droppable_one() {
        let pinned = Held { droppable: false, ..held("a", 1, 3) };
        let all = [held("a", 1, 1), held("a", 0, 2), pinned];
        assert_eq!(to_drop(&all, |_| 0, u64::MAX), [0, 1]);
        assert_eq!(to_drop(&[held("a", 0, 1)], |_| 0, u64::MAX), [0], "one that holds nothing goes too");
    }
}
