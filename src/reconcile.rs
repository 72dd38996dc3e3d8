//! `sluice reconcile`: checks every (rule, sku) ledger of the shared store
//! after a crash and, given the tickets the backend actually placed,
//! commits those and releases the holds it never placed.
//!
//! Findings: a committed ticket short of units (an oversell), a live
//! ticket holding another number of units than it took, a hold past its
//! lease or without one. Actions (dry run unless applied): commit every
//! placed ticket that is not committed (a commit takes its units back from
//! stock if its hold was released); release every in-flight hold sent
//! longer than `min_age` ago that the backend did not place. Queued holds are left to
//! the queue (they have not reached the backend yet).
//!
//! Safe while gateway nodes are live: every change is the store's own
//! atomic step (a commit is one RENAME or takes units back; a release runs
//! under WATCH), so a settlement racing reconcile is never doubled, a live
//! node's late "yes" still wins over a reconcile release, and `min_age`
//! keeps reconcile away from orders still on their way.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::store::{Store, StoreError, TicketAudit, TicketState};
use crate::vocab::{now_ms, ReleaseReason, SkuKey, TicketId};

/// Which skus to look at.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only this rule.
    pub rule: Option<String>,
    /// Only this sku.
    pub sku: Option<String>,
}

impl Scope {
    fn covers(&self, key: &SkuKey) -> bool {
        self.rule.as_deref().is_none_or(|r| r == &*key.rule)
            && self.sku.as_deref().is_none_or(|s| s == &*key.sku)
    }
}

/// A change reconcile makes (or would make).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The backend placed it: sell its units.
    Commit(SkuKey, TicketId),
    /// The backend did not place it: return its units.
    Release(SkuKey, TicketId),
}

/// What reconcile found in one sku.
#[derive(Clone, Debug, Default)]
pub struct SkuReport {
    /// The sku.
    pub key: Option<SkuKey>,
    /// Units in stock.
    pub available: u64,
    /// Units held by live tickets.
    pub held: u64,
    /// Units sold.
    pub sold: u64,
    /// Tickets on record.
    pub tickets: usize,
    /// Problems, one line each.
    pub findings: Vec<String>,
    /// Changes to make.
    pub actions: Vec<Action>,
}

/// The whole report.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Per sku.
    pub skus: Vec<SkuReport>,
    /// Placed tickets found in no sku of the scope.
    pub unknown_placed: Vec<TicketId>,
}

impl Report {
    /// Whether anything is wrong or to be done.
    pub fn is_clean(&self) -> bool {
        self.unknown_placed.is_empty()
            && self
                .skus
                .iter()
                .all(|s| s.findings.is_empty() && s.actions.is_empty())
    }

    /// Every action, in order.
    pub fn actions(&self) -> impl Iterator<Item = &Action> {
        self.skus.iter().flat_map(|s| s.actions.iter())
    }

    /// The report as text, one block per sku.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.skus {
            let Some(key) = &s.key else { continue };
            let _ = writeln!(
                out,
                "{key}: available {} held {} sold {} ({} tickets){}",
                s.available,
                s.held,
                s.sold,
                s.tickets,
                if s.findings.is_empty() && s.actions.is_empty() {
                    ": adds up"
                } else {
                    ""
                }
            );
            for f in &s.findings {
                let _ = writeln!(out, "  ! {f}");
            }
            for a in &s.actions {
                let _ = match a {
                    Action::Commit(_, t) => writeln!(out, "  + commit {t} (placed by the backend)"),
                    Action::Release(_, t) => {
                        writeln!(
                            out,
                            "  - release {t} (in flight, not placed by the backend)"
                        )
                    }
                };
            }
        }
        for t in &self.unknown_placed {
            let _ = writeln!(
                out,
                "! placed ticket {t} is not in the store (expired, or outside --rule/--sku)"
            );
        }
        out
    }
}

/// Reads the tickets the backend placed: one per line, the first word of
/// each (so `SELECT ticket, ... FROM orders` output works); blank lines
/// and `#` comments are skipped. Errors name `file:line`.
pub fn read_placed(path: &Path) -> Result<HashSet<TicketId>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut placed = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let word = line
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == '|')
            .find(|w| !w.is_empty())
            .unwrap_or("");
        let word = word.trim_matches(|c| c == '"' || c == '\'');
        match TicketId::parse(word) {
            Some(t) => {
                placed.insert(t);
            }
            None => {
                return Err(format!(
                    "{}:{}: {word:?} is not a ticket (32 lowercase hex characters)",
                    path.display(),
                    i + 1
                ))
            }
        }
    }
    Ok(placed)
}

/// Looks at every sku in `scope` and plans what to do.
pub async fn plan(
    store: &dyn Store,
    scope: &Scope,
    placed: Option<&HashSet<TicketId>>,
    min_age: Duration,
) -> Result<Report, StoreError> {
    let now = now_ms();
    let min_age_ms = u64::try_from(min_age.as_millis()).unwrap_or(u64::MAX);
    let mut report = Report::default();
    let mut seen = HashSet::new();
    for key in store.skus().await? {
        if !scope.covers(&key) {
            continue;
        }
        let Some(audit) = store.audit(&key).await? else {
            continue;
        };
        let mut s = SkuReport {
            key: Some(key.clone()),
            available: audit.available,
            tickets: audit.tickets.len(),
            ..SkuReport::default()
        };
        for t in &audit.tickets {
            seen.insert(t.id);
            s.held += t.held;
            s.sold += t.sold;
            findings(t, now, &mut s.findings);
            let Some(placed) = placed else { continue };
            if placed.contains(&t.id) {
                if t.state != TicketState::Committed || t.sold < u64::from(t.qty) {
                    s.actions.push(Action::Commit(key.clone(), t.id));
                }
            } else if t.state == TicketState::Held && now.saturating_sub(t.since_ms) >= min_age_ms {
                s.actions.push(Action::Release(key.clone(), t.id));
            }
        }
        report.skus.push(s);
    }
    if let Some(placed) = placed {
        let mut unknown: Vec<TicketId> = placed.difference(&seen).copied().collect();
        unknown.sort();
        report.unknown_placed = unknown;
    }
    Ok(report)
}

fn findings(t: &TicketAudit, now: u64, out: &mut Vec<String>) {
    let qty = u64::from(t.qty);
    let live = matches!(t.state, TicketState::Queued | TicketState::Held);
    let what = match t.state {
        TicketState::Queued => "queued",
        _ => "in flight",
    };
    if t.state == TicketState::Committed && t.sold < qty {
        out.push(format!(
            "{} committed with {} of {qty} units: oversold by {}",
            t.id,
            t.sold,
            qty - t.sold
        ));
    }
    if live && t.held != qty {
        out.push(format!(
            "{} {what} holds {} units, took {qty}",
            t.id, t.held
        ));
    }
    if live {
        match t.lease_ms {
            Some(lease) if lease <= now => out.push(format!(
                "{} {what}, past its lease by {}s",
                t.id,
                (now - lease) / 1000
            )),
            Some(_) => {}
            None => out.push(format!("{} {what} without a lease", t.id)),
        }
    }
}

/// Applies the plan's actions; gives one line per action with what
/// actually happened.
pub async fn apply(store: &dyn Store, report: &Report, ttl: Duration) -> Vec<String> {
    let mut lines = Vec::new();
    for action in report.actions() {
        let line = match action {
            Action::Commit(key, t) => match store.commit(key, *t, None, ttl).await {
                Ok(c) => format!("committed {t} ({key}): {c:?}"),
                Err(e) => format!("could not commit {t} ({key}): {e}"),
            },
            Action::Release(key, t) => {
                match store.release(key, *t, ReleaseReason::Reconcile).await {
                    Ok(n) => format!("released {t} ({key}): {n} units back in stock"),
                    Err(e) => format!("could not release {t} ({key}): {e}"),
                }
            }
        };
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Reservation, Reserved};

    async fn won(s: &dyn Store, key: &SkuKey, user: &str, lease: Duration) -> TicketId {
        let ticket = TicketId::random();
        let r = Reservation {
            key,
            ticket,
            user,
            qty: 1,
            marks: &[],
            per_user_limit: None,
            lease,
        };
        assert_eq!(s.reserve(&r).await.expect("reserve"), Reserved::Won);
        ticket
    }

    #[tokio::test]
    async fn placed_tickets_are_committed_and_the_rest_released() {
        let s = MemoryStore::new();
        let key = SkuKey::new("phone", "p1");
        s.set_available(&key, 5).await.expect("load");
        let hour = Duration::from_secs(3600);
        let placed_held = won(&s, &key, "a", hour).await;
        let placed_released = won(&s, &key, "b", hour).await;
        let never = won(&s, &key, "c", hour).await;
        let sold = won(&s, &key, "d", hour).await;
        s.commit(&key, sold, None, hour).await.expect("commit");
        s.release(&key, placed_released, ReleaseReason::LeaseExpired)
            .await
            .expect("release");
        let placed: HashSet<TicketId> = [placed_held, placed_released, sold].into_iter().collect();
        let report = plan(&s, &Scope::default(), Some(&placed), Duration::ZERO)
            .await
            .expect("plan");
        let actions: Vec<&Action> = report.actions().collect();
        assert_eq!(actions.len(), 3, "{}", report.render());
        assert!(actions.contains(&&Action::Commit(key.clone(), placed_held)));
        assert!(actions.contains(&&Action::Commit(key.clone(), placed_released)));
        assert!(actions.contains(&&Action::Release(key.clone(), never)));
        // A dry run changed nothing.
        assert_eq!(s.stock(&key).await.expect("view").expect("loaded").sold, 1);
        let done = apply(&s, &report, hour).await;
        assert_eq!(done.len(), 3, "{done:?}");
        let v = s.stock(&key).await.expect("view").expect("loaded");
        assert_eq!((v.sold, v.in_flight, v.available), (3, 0, 2));
        let again = plan(&s, &Scope::default(), Some(&placed), Duration::ZERO)
            .await
            .expect("plan");
        assert!(again.is_clean(), "{}", again.render());
    }

    #[tokio::test]
    async fn young_holds_and_other_skus_are_left_alone() {
        let s = MemoryStore::new();
        let (p1, p2) = (SkuKey::new("phone", "p1"), SkuKey::new("phone", "p2"));
        s.set_available(&p1, 2).await.expect("load");
        s.set_available(&p2, 2).await.expect("load");
        let hour = Duration::from_secs(3600);
        won(&s, &p1, "a", hour).await;
        won(&s, &p2, "b", hour).await;
        let placed = HashSet::new();
        let scope = Scope {
            rule: None,
            sku: Some("p1".into()),
        };
        let young = plan(&s, &scope, Some(&placed), hour).await.expect("plan");
        assert_eq!(young.skus.len(), 1);
        assert_eq!(young.actions().count(), 0, "{}", young.render());
        let old = plan(&s, &scope, Some(&placed), Duration::ZERO)
            .await
            .expect("plan");
        assert_eq!(old.actions().count(), 1);
    }

    #[tokio::test]
    async fn holds_past_their_lease_are_reported() {
        let s = MemoryStore::new();
        let key = SkuKey::new("phone", "p1");
        s.set_available(&key, 1).await.expect("load");
        let t = won(&s, &key, "a", Duration::ZERO).await;
        let report = plan(&s, &Scope::default(), None, Duration::ZERO)
            .await
            .expect("plan");
        let text = report.render();
        assert!(
            text.contains(&format!("{t} in flight, past its lease")),
            "{text}"
        );
        assert!(!report.is_clean());
    }

    #[test]
    fn placed_files_take_the_first_word_and_name_bad_lines() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("placed.txt");
        let t = TicketId(0xabc);
        std::fs::write(
            &path,
            format!("# ticket, user\n\n{t}, u1\n\"{t}\"\t2026-11-11\nnot-a-ticket\n"),
        )
        .expect("write");
        let e = read_placed(&path).expect_err("bad line");
        assert!(
            e.ends_with(":5: \"not-a-ticket\" is not a ticket (32 lowercase hex characters)"),
            "{e}"
        );
        std::fs::write(&path, format!("{t}\n{t} dup\n")).expect("write");
        assert_eq!(read_placed(&path).expect("read"), [t].into_iter().collect());
    }
}
