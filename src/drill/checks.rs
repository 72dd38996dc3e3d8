//! The invariants a drill can verify, and the admin API calls they need
//! (`GET /admin/v1/stock/{rule}/{sku}`, with the bearer token when one is
//! set):
//!
//! - winners == units sold: the units the drill's users won (forwarded
//!   answers the rule's `release_on` does not give back, plus queued
//!   tickets seen placed) equal the growth of the stock view's `sold`;
//! - the per-user limit: no user won more units of a sku than the rule
//!   allows (checked from the answers alone, so it runs without `--admin`);
//! - the stock view adds up: `initial == available + in_flight + queued + sold`;
//! - with `--stock K`: the K units there were are all accounted for
//!   (`K == available + in_flight + queued + sold`): none oversold, none lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::conn::{Client, Keep};
use super::stats::Win;
use super::DrillError;
use crate::store::StockView;

/// How long to wait for holds to settle (commits land just after their
/// answers; queued winners need the backend) before the final view.
pub const SETTLE: Duration = Duration::from_secs(10);

/// Settling is checked this often.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// Admin calls get this long each.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin listener and its token.
pub struct Admin {
    addr: SocketAddr,
    host: String,
    token: Option<String>,
    /// Where the token came from, for messages.
    token_env: String,
}

impl Admin {
    /// An admin client.
    pub fn new(addr: SocketAddr, host: String, token: Option<String>, token_env: String) -> Self {
        Self {
            addr,
            host,
            token,
            token_env,
        }
    }

    /// The stock view of a sku, or `None` when it was never loaded.
    pub async fn stock(&self, rule: &str, sku: &str) -> Result<Option<StockView>, DrillError> {
        let fail = |message: String| DrillError::Admin {
            addr: self.addr,
            message,
        };
        let mut request = format!(
            "GET /admin/v1/stock/{rule}/{sku} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.host
        );
        if let Some(t) = &self.token {
            request.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        request.push_str("\r\n");
        let mut client = Client::new(self.addr, ADMIN_TIMEOUT);
        let mut body = Vec::new();
        let answer = client
            .send(request.as_bytes(), &mut body, Keep::All)
            .await
            .map_err(|f| {
                fail(format!(
                    "GET /admin/v1/stock/{rule}/{sku}: no answer ({f:?})"
                ))
            })?;
        match answer.status {
            200 => serde_json::from_slice(&body).map(Some).map_err(|e| {
                fail(format!(
                    "GET /admin/v1/stock/{rule}/{sku}: not a stock view ({e}): {}",
                    String::from_utf8_lossy(&body)
                ))
            }),
            404 => Ok(None),
            401 => Err(fail(format!(
                "the admin API wants a bearer token: set {} (or name another variable with --admin-token-env)",
                self.token_env
            ))),
            s => Err(fail(format!(
                "GET /admin/v1/stock/{rule}/{sku} answered {s}: {}",
                String::from_utf8_lossy(&body)
            ))),
        }
    }

    /// The views of every sku; a sku never loaded is an error that says
    /// how to load it.
    pub async fn views(&self, rule: &str, skus: &[String]) -> Result<Vec<StockView>, DrillError> {
        let mut views = Vec::with_capacity(skus.len());
        for sku in skus {
            match self.stock(rule, sku).await? {
                Some(v) => views.push(v),
                None => {
                    return Err(DrillError::Admin {
                        addr: self.addr,
                        message: format!(
                            "{rule}/{sku} was never loaded: load it first with PUT /admin/v1/stock/{rule}/{sku} {{\"available\": N}}"
                        ),
                    })
                }
            }
        }
        Ok(views)
    }

    /// The views once nothing is held (or after [`SETTLE`]).
    pub async fn settled_views(
        &self,
        rule: &str,
        skus: &[String],
    ) -> Result<Vec<StockView>, DrillError> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let views = self.views(rule, skus).await?;
            if views.iter().all(StockView::settled) || Instant::now() >= deadline {
                return Ok(views);
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }
}

/// One verified invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub pass: bool,
    /// The numbers.
    pub detail: String,
}

/// The stock views of one (rule, sku) around the drill.
pub struct SkuViews<'a> {
    /// The sku.
    pub sku: &'a str,
    /// Before the first request.
    pub before: StockView,
    /// After the drill, settled.
    pub after: StockView,
}

/// Winners == units sold, per sku.
pub fn winners_sold(views: &[SkuViews<'_>], won: &[u64]) -> Check {
    let mut pass = true;
    let mut parts = Vec::new();
    for (v, won) in views.iter().zip(won) {
        let sold = v.after.sold.checked_sub(v.before.sold);
        pass &= sold == Some(*won);
        parts.push(match sold {
            Some(s) => format!(
                "{}: {won} units won, sold {} -> {} (+{s})",
                v.sku, v.before.sold, v.after.sold
            ),
            None => format!(
                "{}: {won} units won, but sold fell {} -> {} (restocked or reset during the drill?)",
                v.sku, v.before.sold, v.after.sold
            ),
        });
    }
    Check {
        name: "winners == units sold".into(),
        pass,
        detail: parts.join("; "),
    }
}

/// The stock view adds up after the drill, per sku.
pub fn adds_up(views: &[SkuViews<'_>]) -> Check {
    let pass = views.iter().all(|v| v.after.initial == v.after.accounted());
    Check {
        name: "stock view adds up".into(),
        pass,
        detail: views
            .iter()
            .map(|v| {
                let a = &v.after;
                format!(
                    "{}: initial {} {} available {} + in_flight {} + queued {} + sold {}",
                    v.sku,
                    a.initial,
                    if a.initial == a.accounted() {
                        "=="
                    } else {
                        "!="
                    },
                    a.available,
                    a.in_flight,
                    a.queued,
                    a.sold
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// The `--stock K` units are all accounted for, per sku.
pub fn stock_matches(views: &[SkuViews<'_>], k: u64) -> Check {
    let pass = views.iter().all(|v| v.after.accounted() == k);
    Check {
        name: format!("units == --stock {k}"),
        pass,
        detail: views
            .iter()
            .map(|v| {
                let a = &v.after;
                format!(
                    "{}: --stock {k} {} available {} + in_flight {} + queued {} + sold {}",
                    v.sku,
                    if a.accounted() == k { "==" } else { "!=" },
                    a.available,
                    a.in_flight,
                    a.queued,
                    a.sold
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// No user won more than `limit` units of one sku.
pub fn per_user(wins: &[Win], skus: &[String], limit: u32) -> Check {
    let mut units: HashMap<(u64, usize), u64> = HashMap::new();
    for w in wins {
        *units.entry((w.user, w.sku)).or_default() += u64::from(w.units);
    }
    let mut over: Vec<((u64, usize), u64)> = units
        .iter()
        .filter(|(_, n)| **n > u64::from(limit))
        .map(|(k, n)| (*k, *n))
        .collect();
    over.sort_unstable();
    let most = units.values().copied().max().unwrap_or(0);
    let detail = if over.is_empty() {
        format!(
            "{} winning users; most units won by one user for one sku: {most} (limit {limit})",
            units.len()
        )
    } else {
        let shown: Vec<String> = over
            .iter()
            .take(5)
            .map(|((u, s), n)| {
                let sku = skus.get(*s).map_or("", String::as_str);
                format!("user #{u} won {n} of {sku}")
            })
            .collect();
        format!(
            "{} users over the limit of {limit}: {}{}",
            over.len(),
            shown.join(", "),
            if over.len() > 5 { ", ..." } else { "" }
        )
    };
    Check {
        name: "per-user limit".into(),
        pass: over.is_empty(),
        detail,
    }
}

/// Units won per sku index.
pub fn won_per_sku(wins: &[Win], skus: usize) -> Vec<u64> {
    let mut won = vec![0u64; skus];
    for w in wins {
        if let Some(n) = won.get_mut(w.sku) {
            *n += u64::from(w.units);
        }
    }
    won
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::stats::WonBy;

    fn view(available: u64, initial: u64, sold: u64) -> StockView {
        StockView {
            available,
            initial,
            sold,
            ..StockView::default()
        }
    }

    fn win(user: u64) -> Win {
        Win {
            user,
            sku: 0,
            units: 1,
            by: WonBy::Forwarded,
        }
    }

    #[test]
    fn checks_pass_and_fail_on_the_numbers() {
        let views = [SkuViews {
            sku: "p1",
            before: view(10, 10, 0),
            after: view(0, 10, 10),
        }];
        assert!(winners_sold(&views, &[10]).pass);
        assert!(!winners_sold(&views, &[9]).pass);
        assert!(adds_up(&views).pass);
        assert!(stock_matches(&views, 10).pass);
        let wrong = stock_matches(&views, 12);
        assert!(!wrong.pass);
        assert!(
            wrong.detail.contains("--stock 12 != available 0"),
            "{}",
            wrong.detail
        );
        let broken = [SkuViews {
            sku: "p1",
            before: view(10, 10, 0),
            after: view(1, 10, 10),
        }];
        assert!(!adds_up(&broken).pass);
    }

    #[test]
    fn a_user_over_the_limit_is_named() {
        let skus = vec!["p1".to_string()];
        assert!(per_user(&[win(1), win(2)], &skus, 1).pass);
        let c = per_user(&[win(1), win(2), win(2)], &skus, 1);
        assert!(!c.pass);
        assert!(c.detail.contains("user #2 won 2 of p1"), "{}", c.detail);
        assert_eq!(won_per_sku(&[win(1), win(2)], 1), vec![2]);
    }
}
