//! The two plays of the sale side by side, and what they mean in one line
//! each, all from the measured numbers.

use std::collections::HashMap;
use std::time::Duration;

use crate::buyers::Seen;
use crate::Phase;

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn pct(part: usize, whole: usize) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.0}%", part as f64 * 100.0 / whole as f64)
}

fn mall(p: &Phase, key: &str) -> u64 {
    p.mall[key].as_u64().unwrap_or(0)
}

/// Users with more than one order.
fn users_twice(p: &Phase) -> usize {
    let mut by_user: HashMap<&str, usize> = HashMap::new();
    for o in &p.books.orders {
        *by_user.entry(o.user.as_str()).or_default() += 1;
    }
    by_user.values().filter(|n| **n > 1).count()
}

/// Prints the table and the summary lines.
pub fn print(a: &Phase, b: &Phase, stock: u64) {
    let row = |label: &str, f: &dyn Fn(&Phase) -> String| {
        println!("{label:<44} {:>22} {:>22}", f(a), f(b));
    };
    row("", &|p| p.name.to_string());
    row("orders placed (mall's books) / stock", &|p| {
        format!("{} / {stock}", p.books.orders.len())
    });
    row("  stock row left, users with two orders", &|p| {
        format!("{}, {}", p.books.stock, users_twice(p))
    });
    row("buyer requests", &|p| p.buyers.answers.len().to_string());
    row("  answered \"order placed\"", &|p| {
        p.buyers.count(Seen::Bought).to_string()
    });
    row("  answered \"queued\" (placed later by Sluice)", &|p| {
        p.buyers.count(Seen::Queued).to_string()
    });
    row("  answered \"sold out\" or refused", &|p| {
        (p.buyers.count(Seen::SoldOut) + p.buyers.count(Seen::Refused)).to_string()
    });
    row("  errors (5xx, broken connection)", &|p| {
        p.buyers.count(Seen::Error).to_string()
    });
    row("  timeouts (no answer within 5 s)", &|p| {
        p.buyers.count(Seen::Timeout).to_string()
    });
    row("buyer latency p50 / p99, every answer", &|p| {
        format!(
            "{} / {}",
            ms(p.buyers.latency(0.5)),
            ms(p.buyers.latency(0.99))
        )
    });
    let told_no = |s: Seen| matches!(s, Seen::SoldOut | Seen::Refused);
    row("  of the answers \"sold out\" or refused", &|p| {
        format!(
            "{} / {}",
            ms(p.buyers.latency_of(0.5, told_no)),
            ms(p.buyers.latency_of(0.99, told_no))
        )
    });
    row("product pages loaded / viewed", &|p| {
        format!(
            "{} / {} ({})",
            p.pages.count(Seen::Page),
            p.pages.answers.len(),
            pct(p.pages.count(Seen::Page), p.pages.answers.len())
        )
    });
    row("product page latency p50 / p99", &|p| {
        format!(
            "{} / {}",
            ms(p.pages.latency(0.5)),
            ms(p.pages.latency(0.99))
        )
    });
    row("order requests that reached the mall", &|p| {
        mall(p, "orders_received").to_string()
    });
    row("most orders inside the mall at once", &|p| {
        format!("{} ({})", mall(p, "orders_peak"), p.cap)
    });
    row("the sale took", &|p| {
        format!("{:.1} s", p.elapsed.as_secs_f64())
    });

    let failed = |p: &Phase| p.buyers.count(Seen::Error) + p.buyers.count(Seen::Timeout);
    let pages_ok = |p: &Phase| pct(p.pages.count(Seen::Page), p.pages.answers.len());
    println!(
        "\n{}: {} of {} buyer requests failed or timed out and {} of product pages loaded; \
         up to {} orders were inside the mall at once, waiting for its {} or for the row lock.",
        a.name,
        failed(a),
        a.buyers.answers.len(),
        pages_ok(a),
        mall(a, "orders_peak"),
        a.cap
    );
    println!(
        "{}: {} failed or timed out, {} of product pages loaded, the mall received {} order \
         requests instead of {}, at most {} at once, and sold {} of {stock}.",
        b.name,
        failed(b),
        pages_ok(b),
        mall(b, "orders_received"),
        mall(a, "orders_received"),
        mall(b, "orders_peak"),
        b.books.orders.len()
    );
}
